// The operator page: one WebSocket feed (snapshot, then deltas) drives every view; the HTTP API
// is used for actions and for lists the feed does not carry (order history, configuration).
// No framework and no build step: the hub serves this file as it is.
'use strict';

const ROW_H = 34;
const SEVERITY_RANK = { critical: 3, major: 2, minor: 1 };
const KEY_STORE = 'cabinet-hub.key';
const MAX_ORDERS = 300;
const MAX_SESSIONS = 300;
const MAX_EVENTS = 40;
const LANG_STORE = 'cabinet-hub.lang';

// Every sentence the page says, per language; `{name}` is filled in by t(). A key missing in
// one language falls back to English, so a sentence added in a hurry shows, if untranslated.
// Keys "kind:value" name the hub's own words for states, reasons and types: English shows the
// word as the API spells it (what the README and the API's users read), so English has none.
const I18N = {
  en: {
    'title': 'cabinet-hub · operator',
    'lang.label': 'Language',
    'signin.lead': 'Sign in with your API key (operator or viewer).',
    'signin.key': 'API key',
    'signin.remember': 'Remember on this browser',
    'signin.submit': 'Sign in',
    'signin.unknown': 'Unknown key.',
    'signin.unreachable': 'Cannot reach the hub: {why}',
    'signin.refused': 'Your key was refused (401). Sign in again.',
    'signin.revoked': 'Your key was revoked. Sign in with another key.',
    'signout': 'Sign out',
    'who.platform': 'platform',
    'tab.fleet': 'Fleet',
    'tab.alerts': 'Alerts',
    'tab.sessions': 'Sessions & orders',
    'tab.abnormal': 'Abnormal orders',
    'tab.exceptions': 'Payment exceptions',
    'tab.settlements': 'Settlements',
    'tab.bills': 'Bills & statistics',
    'tab.service': 'Service time',
    'conn.connecting': 'connecting…',
    'conn.reconnecting': 'reconnecting…',
    'conn.live': 'live',
    'conn.down': 'disconnected — retrying in {n}s',
    'count.cabinets': 'cabinets',
    'count.online': 'online',
    'count.offline': 'offline',
    'count.alerting': 'with alerts',
    'count.faulted': 'faulted',
    'count.session': 'in a session',
    'fleet.search': 'Search id or point…',
    'fleet.searchLabel': 'search',
    'fleet.filterLabel': 'filter',
    'fleet.sortLabel': 'sort',
    'filter.all': 'All',
    'filter.online': 'Online',
    'filter.offline': 'Offline',
    'filter.alerting': 'With active alerts',
    'filter.faulted': 'Faulted / locked down',
    'filter.session': 'In a session',
    'sort.severity': 'Sort: severity',
    'sort.id': 'Sort: id',
    'sort.temp': 'Sort: temperature',
    'sort.seen': 'Sort: last seen',
    'fleet.shown': '{n} shown',
    'col.cabinet': 'Cabinet',
    'col.point': 'Point',
    'col.link': 'Link',
    'col.door': 'Door',
    'col.lock': 'Lock',
    'col.cameras': 'Cameras',
    'col.temp': 'Temp',
    'col.light': 'Light',
    'col.alerts': 'Alerts',
    'col.session': 'Session',
    'col.severity': 'Severity',
    'col.alert': 'Alert',
    'col.raised': 'Raised',
    'col.detail': 'Detail',
    'col.state': 'State',
    'col.user': 'User',
    'col.channel': 'Channel',
    'col.mode': 'Mode',
    'col.updated': 'Updated',
    'col.order': 'Order',
    'col.status': 'Status',
    'col.total': 'Total',
    'col.paid': 'Paid',
    'col.refunded': 'Refunded',
    'col.received': 'Received',
    'col.provider': 'Provider',
    'col.reason': 'Reason',
    'col.notice': 'Notice',
    'col.commission': 'Commission',
    'col.platform': 'Platform',
    'col.merchant': 'Merchant',
    'col.returned': 'Returned',
    'col.lastError': 'Last error',
    'col.orders': 'Orders',
    'col.sales': 'Sales',
    'col.bestSellers': 'Best sellers',
    'col.made': 'Made',
    'col.cabinets': 'Cabinets',
    'col.years': 'Years',
    'col.amount': 'Amount',
    'col.reference': 'Reference',
    'online': 'online',
    'offline': 'offline',
    'cams.ok': '{ok}/{n} ok',
    'alerts.empty': 'No active alerts.',
    'alert.ack': 'Acknowledge',
    'alert.clear': 'Clear',
    'alert.acked': 'acknowledged',
    'alert.new': 'new',
    'err.ack': 'Could not ack {type} on {cabinet}: {why}',
    'err.clear': 'Could not clear {type} on {cabinet}: {why}',
    'err.forbidden': 'Your key may not do this (403): an operator key is needed.',
    'err.orders': 'Could not load orders: {why}',
    'sessions.live': 'Live sessions',
    'sessions.recentOrders': 'Recent orders',
    'close.lead': 'Close session',
    'close.colon': ':',
    'close.reason': 'why (kept with the session)',
    'close.reasonLabel': 'reason',
    'close.submit': 'Close session',
    'close.cancel': 'cancel',
    'close.open': 'Close…',
    'close.done': 'closed: {state}',
    'err.close': 'Could not close session {id}: {why}',
    'abnormal.lead': 'Orders the cameras could not settle. Enter what the shopper took (from the video) and resolve: the order is priced and charged.',
    'abnormal.empty': 'No abnormal orders.',
    'abnormal.card': ' · cabinet {cabinet} · user {user} · {channel} · ',
    'abnormal.sku': 'sku',
    'abnormal.qty': 'quantity',
    'abnormal.removeItem': 'remove',
    'abnormal.addItem': '+ item',
    'abnormal.resolve': 'Resolve and charge',
    'abnormal.resolving': 'resolving…',
    'abnormal.resolved': 'resolved: {status}',
    'exceptions.lead': 'Payment notices that did not match the order they name (amount, application, merchant, or no such order). None was applied; check each with the provider before touching the order.',
    'exceptions.empty': 'No payment exceptions.',
    'settlements.lead': "How each paid order is split (分账): the platform's commission, the rest released to the merchant. A failed one is retried by itself; after fixing its cause (a receiver not bound, the platform's account empty) retry it now.",
    'settlements.empty': 'No settlements.',
    'settlements.retry': 'Retry now',
    'err.retry': 'Could not retry the settlement: {why}',
    'bill.merchant': 'Merchant',
    'bill.merchantId': 'merchant id',
    'bill.day': 'Day',
    'bill.show': 'Show',
    'bill.download': 'Download CSV',
    'bill.byHour': 'Sales by hour',
    'bill.chartLabel': 'sales by hour',
    'bill.hour': '{hour}:00 · {orders} orders · {sales}',
    'bill.empty': 'Pick a day.',
    'bill.pick': 'Pick a merchant and a day.',
    'err.bill': 'Could not load the bill: {why}',
    'err.billDownload': 'Could not download the bill: {why}',
    'total.orders': 'orders',
    'total.sales': 'sales',
    'total.average basket': 'average basket',
    'total.list price': 'list price',
    'total.promotions': 'promotions',
    'total.refunded': 'refunded',
    'total.refundedValue': '{amount} ({n})',
    'total.commission': 'commission',
    'total.commission returned': 'commission returned',
    'total.commission pending': 'commission pending',
    'total.service time': 'service time',
    'total.net': 'net',
    'service.lead': 'Service time (设备使用时长) is bought in whole years per cabinet; a cabinet out of service time refuses shoppers. Pay with WeChat by scanning the code within 5 minutes; an unpaid order is then cancelled.',
    'service.merchant': 'Merchant',
    'service.merchantId': 'merchant id',
    'service.cabinets': 'Cabinets',
    'service.years': 'Years',
    'service.buy': 'Buy',
    'service.empty': 'No service orders.',
    'service.scan': 'Scan with WeChat to pay {amount} for {n} cabinet(s) × {years} year(s), before {by}.',
    'service.paid': 'Paid {amount}: the cabinets serve {years} more year(s).',
    'service.cancelled': 'Not paid in time: the order was cancelled. Buy again to pay.',
    'service.qrAlt': 'WeChat Pay code',
    'err.serviceOrders': 'Could not load service orders: {why}',
    'err.serviceOrder': 'Could not make the order: {why}',
    'err.qr': 'Could not show the code: {why}',
    'expiring.expired': '{n} cabinet(s) out of service time — they refuse shoppers. ',
    'expiring.soon': 'Service time ends within 30 days for {n} cabinet(s): ',
    'expiring.days': '{id} · {days} d',
    'expiring.gone': '{id} · expired',
    'expiring.more': ' and {n} more',
    'expiring.renew': 'Renew…',
    'err.expiring': 'Could not load service expiry: {why}',
    'pay.wechat': 'WeChat Pay',
    'pay.alipay': 'Alipay',
    'pay.ready': '{channel}: ready',
    'pay.notReady': '{channel}: not ready',
    'pay.simulated': ' (simulator)',
    'pay.realNeeds': ' — a real provider needs: {missing}',
    'pay.missing': ' — missing: {missing}',
    'need.provider': 'no provider credentials on this hub',
    'need.wechat_sub_mchid': 'WeChat sub-merchant number',
    'need.service_phone': 'customer-service phone',
    'need.alipay_smid': 'Alipay sub-merchant id',
    'need.alipay_app_auth_token': 'Alipay authorisation',
    'list.sep': ', ',
    'detail.label': 'cabinet detail',
    'detail.close': 'close',
    'detail.alerts': 'Active alerts',
    'detail.config': 'Configuration',
    'detail.events': 'Recent events',
    'detail.orders': 'Recent orders',
    'detail.unknown': 'unknown cabinet',
    'detail.none': 'none',
    'err.cabinet': 'Could not load the cabinet: {why}',
    'cfg.target': 'Target °C',
    'cfg.lo': 'Range low °C',
    'cfg.hi': 'Range high °C',
    'cfg.lightOn': 'Light on',
    'cfg.lightOff': 'Light off',
    'cfg.heartbeat': 'Heartbeat s',
    'cfg.foreignObjectLock': 'Foreign-object lock',
    'cfg.save': 'Save and push',
    'cfg.none': 'no configuration yet (activate the cabinet)',
    'cfg.version': 'version {v}',
    'cfg.unchanged': 'nothing changed',
    'cfg.saving': 'saving…',
    'cfg.savedPushed': 'saved version {v}, pushed to the cabinet',
    'cfg.savedLater': 'saved version {v}, will be pushed when it reconnects',
    'kv.link': 'link',
    'kv.point': 'point',
    'kv.status': 'status',
    'kv.door': 'door',
    'kv.lock': 'lock',
    'kv.cameras': 'cameras',
    'kv.temperature': 'temperature',
    'kv.light': 'light',
    'kv.faulted': 'faulted',
    'kv.lockedDown': 'locked down',
    'kv.session': 'session',
    'kv.configVersion': 'config version',
    'kv.firmware': 'firmware',
    'kv.lastSeen': 'last seen',
    'kv.serviceUntil': 'service until',
    'kv.camOk': '#{id} ok',
    'kv.camFault': '#{id} FAULT',
    'kv.faultedYes': 'yes — no new sessions',
    'kv.yes': 'yes',
    'kv.no': 'no',
    'kv.versions': '{reported} reported / {desired} desired',
    'event.appeared': 'appeared',
    'event.change': '{field} {from} → {to}',
    'event.temp': 'temp {t}°C',
    'event.cameras': 'cameras ok {ok}/{n}',
    'event.alert': 'alert {type} {state}',
    'event.alertCleared': 'alert {type} raised, cleared {when}',
    'event.session': 'session {id} {state}',
    'event.failure': ' ({failure})',
    'event.order': 'order {id} {status}',
    'event.total': ' {total}',
    'field.online': 'online',
    'field.door': 'door',
    'field.lock': 'lock',
    'field.light': 'light',
    'field.faulted': 'faulted',
    'field.locked_down': 'locked_down',
    'tab.stock': 'Stock',
    'col.product': 'Product',
    'col.name': 'Name',
    'col.qty': 'Quantity',
    'col.lowAt': 'Low at',
    'col.found': 'Found',
    'col.expected': 'Expected',
    'col.counted': 'Counted',
    'col.difference': 'Difference',
    'col.restock': 'Restock',
    'col.started': 'Started',
    'col.restocker': 'Restocker',
    'stock.heading': 'Stock',
    'stock.cabinet': 'Cabinet',
    'stock.cabinetId': 'cabinet id',
    'stock.show': 'Show',
    'stock.pick': 'Pick a cabinet.',
    'stock.none': 'This cabinet keeps no stock yet: its first restock counts it in.',
    'stock.summary': '{cabinet}: {n} product(s), {low} low',
    'stock.low': 'low',
    'stock.lowSeen': 'Fell to their low mark since the page opened: ',
    'stock.discrepancies': 'Open stock discrepancies',
    'stock.discrepanciesLead': "What a restock's count found against what was expected: the stock before plus the restock's plan (no plan: a stock-taking). Resolve each with what you found.",
    'stock.noDiscrepancies': 'No open stock discrepancies.',
    'stock.note': 'what you found',
    'stock.noteLabel': 'note',
    'stock.resolve': 'Resolve',
    'stock.resolving': 'resolving…',
    'stock.alreadyResolved': 'The discrepancy of {sku} in {cabinet} was already resolved.',
    'stock.history': 'Restock history',
    'stock.historyLead': 'The latest restocks and stock-takings, newest first, as they happen.',
    'stock.noRestocks': 'No restocks seen.',
    'detail.stock': 'Stock…',
    'err.stock': 'Could not load the stock of {cabinet}: {why}',
    'err.discrepancies': 'Could not load stock discrepancies: {why}',
    'err.restocks': 'Could not load the restock history: {why}',
    'recognition.prepaid': 'Recognitions (prepaid): {n} left',
    'recognition.low': ' — running low: ask the platform to top it up',
    'recognition.refused': ' — none left: purchases are refused until it is topped up',
    'recognition.owed': ' — none left: further recognitions are owed and taken from the next top-up',
    'recognition.postpaid': 'Recognitions (postpaid): {n} today · {fee}',
    'recognition.each': ' ({fee} each)',
  },
  zh: {
    'title': 'cabinet-hub · 运营后台',
    'lang.label': '语言',
    'signin.lead': '使用 API 密钥登录（运营或只读密钥）。',
    'signin.key': 'API 密钥',
    'signin.remember': '在此浏览器上记住',
    'signin.submit': '登录',
    'signin.unknown': '密钥无效。',
    'signin.unreachable': '无法连接服务器：{why}',
    'signin.refused': '密钥被拒绝（401），请重新登录。',
    'signin.revoked': '密钥已被吊销，请用其他密钥登录。',
    'signout': '退出登录',
    'who.platform': '平台',
    'tab.fleet': '开门柜',
    'tab.alerts': '告警',
    'tab.sessions': '会话与订单',
    'tab.abnormal': '异常订单',
    'tab.exceptions': '支付异常',
    'tab.settlements': '分账',
    'tab.bills': '交易账单与统计',
    'tab.service': '设备使用时长',
    'conn.connecting': '连接中…',
    'conn.reconnecting': '重新连接中…',
    'conn.live': '实时',
    'conn.down': '已断开 — {n} 秒后重试',
    'count.cabinets': '开门柜',
    'count.online': '在线',
    'count.offline': '离线',
    'count.alerting': '有告警',
    'count.faulted': '故障',
    'count.session': '会话中',
    'fleet.search': '搜索编号或点位…',
    'fleet.searchLabel': '搜索',
    'fleet.filterLabel': '筛选',
    'fleet.sortLabel': '排序',
    'filter.all': '全部',
    'filter.online': '在线',
    'filter.offline': '离线',
    'filter.alerting': '有未清除告警',
    'filter.faulted': '故障 / 已锁柜',
    'filter.session': '会话中',
    'sort.severity': '排序：严重程度',
    'sort.id': '排序：编号',
    'sort.temp': '排序：温度',
    'sort.seen': '排序：最后在线',
    'fleet.shown': '显示 {n} 台',
    'col.cabinet': '开门柜',
    'col.point': '点位',
    'col.link': '连接',
    'col.door': '门',
    'col.lock': '锁',
    'col.cameras': '摄像头',
    'col.temp': '温度',
    'col.light': '灯带',
    'col.alerts': '告警',
    'col.session': '会话',
    'col.severity': '级别',
    'col.alert': '告警',
    'col.raised': '发生时间',
    'col.detail': '详情',
    'col.state': '状态',
    'col.user': '用户',
    'col.channel': '支付渠道',
    'col.mode': '模式',
    'col.updated': '更新时间',
    'col.order': '订单',
    'col.status': '状态',
    'col.total': '金额',
    'col.paid': '已付',
    'col.refunded': '已退款',
    'col.received': '收到时间',
    'col.provider': '支付渠道',
    'col.reason': '原因',
    'col.notice': '通知',
    'col.commission': '佣金',
    'col.platform': '平台',
    'col.merchant': '商户',
    'col.returned': '已回退',
    'col.lastError': '最近错误',
    'col.orders': '订单数',
    'col.sales': '销售额',
    'col.bestSellers': '畅销商品',
    'col.made': '下单时间',
    'col.cabinets': '开门柜',
    'col.years': '年数',
    'col.amount': '金额',
    'col.reference': '交易单号 / 凭证',
    'online': '在线',
    'offline': '离线',
    'cams.ok': '{ok}/{n} 正常',
    'alerts.empty': '没有未清除的告警。',
    'alert.ack': '确认',
    'alert.clear': '清除',
    'alert.acked': '已确认',
    'alert.new': '未确认',
    'err.ack': '无法确认开门柜 {cabinet} 的告警 {type}：{why}',
    'err.clear': '无法清除开门柜 {cabinet} 的告警 {type}：{why}',
    'err.forbidden': '此密钥无权执行该操作（403）：需要运营密钥。',
    'err.orders': '无法加载订单：{why}',
    'sessions.live': '进行中的会话',
    'sessions.recentOrders': '最近订单',
    'close.lead': '关闭会话',
    'close.colon': '：',
    'close.reason': '原因（随会话保存）',
    'close.reasonLabel': '原因',
    'close.submit': '关闭会话',
    'close.cancel': '取消',
    'close.open': '关闭…',
    'close.done': '已关闭：{state}',
    'err.close': '无法关闭会话 {id}：{why}',
    'abnormal.lead': '摄像头未能结算的订单。请根据视频录入顾客取走的商品并处理：订单随即计价并扣款。',
    'abnormal.empty': '暂无异常订单。',
    'abnormal.card': ' · 开门柜 {cabinet} · 用户 {user} · {channel} · ',
    'abnormal.sku': '商品编码',
    'abnormal.qty': '数量',
    'abnormal.removeItem': '移除',
    'abnormal.addItem': '+ 商品',
    'abnormal.resolve': '处理并扣款',
    'abnormal.resolving': '处理中…',
    'abnormal.resolved': '已处理：{status}',
    'exceptions.lead': '与所指订单不符的支付通知（金额、应用、商户不符，或没有该订单）。这些通知均未入账；处理订单前请先逐条向支付渠道核实。',
    'exceptions.empty': '暂无支付异常。',
    'settlements.lead': '每笔已支付订单的分账：平台收取佣金，其余结算给商户。失败的分账会自动重试；排除原因后（如未绑定分账接收方、平台账户余额不足）可立即重试。',
    'settlements.empty': '暂无分账。',
    'settlements.retry': '立即重试',
    'err.retry': '无法重试分账：{why}',
    'bill.merchant': '商户',
    'bill.merchantId': '商户编号',
    'bill.day': '日期',
    'bill.show': '查看',
    'bill.download': '下载 CSV',
    'bill.byHour': '分时销售额',
    'bill.chartLabel': '分时销售额',
    'bill.hour': '{hour}:00 · {orders} 单 · {sales}',
    'bill.empty': '请选择日期。',
    'bill.pick': '请选择商户和日期。',
    'err.bill': '无法加载交易账单：{why}',
    'err.billDownload': '无法下载交易账单：{why}',
    'total.orders': '订单数',
    'total.sales': '销售额',
    'total.average basket': '客单价',
    'total.list price': '原价合计',
    'total.promotions': '优惠',
    'total.refunded': '退款',
    'total.refundedValue': '{amount}（{n} 笔）',
    'total.commission': '佣金',
    'total.commission returned': '已回退佣金',
    'total.commission pending': '待分账佣金',
    'total.service time': '设备使用时长',
    'total.net': '净收入',
    'service.lead': '设备使用时长按开门柜整年购买；使用时长到期的开门柜将拒绝顾客购物。请在 5 分钟内用微信扫码支付，逾期未付的订单将被取消。',
    'service.merchant': '商户',
    'service.merchantId': '商户编号',
    'service.cabinets': '开门柜',
    'service.years': '年数',
    'service.buy': '购买',
    'service.empty': '暂无设备使用时长订单。',
    'service.scan': '请在 {by} 前用微信扫码支付 {amount}（{n} 台开门柜 × {years} 年）。',
    'service.paid': '已支付 {amount}：开门柜使用时长延长 {years} 年。',
    'service.cancelled': '未按时支付：订单已取消。请重新购买后支付。',
    'service.qrAlt': '微信支付二维码',
    'err.serviceOrders': '无法加载设备使用时长订单：{why}',
    'err.serviceOrder': '无法创建订单：{why}',
    'err.qr': '无法显示二维码：{why}',
    'expiring.expired': '{n} 台开门柜的设备使用时长已到期，将拒绝顾客购物。',
    'expiring.soon': '{n} 台开门柜的设备使用时长将在 30 天内到期：',
    'expiring.days': '{id} · {days} 天',
    'expiring.gone': '{id} · 已到期',
    'expiring.more': '，另有 {n} 台',
    'expiring.renew': '续费…',
    'err.expiring': '无法加载设备使用时长到期信息：{why}',
    'pay.wechat': '微信支付',
    'pay.alipay': '支付宝',
    'pay.ready': '{channel}：已就绪',
    'pay.notReady': '{channel}：未就绪',
    'pay.simulated': '（模拟器）',
    'pay.realNeeds': ' — 接入真实支付渠道还需：{missing}',
    'pay.missing': ' — 缺少：{missing}',
    'need.provider': '本服务未配置支付渠道凭据',
    'need.wechat_sub_mchid': '微信支付子商户号',
    'need.service_phone': '客服电话',
    'need.alipay_smid': '支付宝二级商户号',
    'need.alipay_app_auth_token': '支付宝应用授权',
    'list.sep': '、',
    'detail.label': '开门柜详情',
    'detail.close': '关闭',
    'detail.alerts': '未清除的告警',
    'detail.config': '配置',
    'detail.events': '最近事件',
    'detail.orders': '最近订单',
    'detail.unknown': '未知开门柜',
    'detail.none': '无',
    'err.cabinet': '无法加载开门柜：{why}',
    'cfg.target': '目标温度 °C',
    'cfg.lo': '温度下限 °C',
    'cfg.hi': '温度上限 °C',
    'cfg.lightOn': '灯带开启',
    'cfg.lightOff': '灯带关闭',
    'cfg.heartbeat': '心跳间隔（秒）',
    'cfg.foreignObjectLock': '异物锁柜',
    'cfg.save': '保存并下发',
    'cfg.none': '暂无配置（请先激活开门柜）',
    'cfg.version': '版本 {v}',
    'cfg.unchanged': '没有改动',
    'cfg.saving': '保存中…',
    'cfg.savedPushed': '已保存版本 {v}，已下发到开门柜',
    'cfg.savedLater': '已保存版本 {v}，开门柜重连后下发',
    'kv.link': '连接',
    'kv.point': '点位',
    'kv.status': '状态',
    'kv.door': '门',
    'kv.lock': '锁',
    'kv.cameras': '摄像头',
    'kv.temperature': '温度',
    'kv.light': '灯带',
    'kv.faulted': '故障',
    'kv.lockedDown': '锁柜',
    'kv.session': '会话',
    'kv.configVersion': '配置版本',
    'kv.firmware': '固件',
    'kv.lastSeen': '最后在线',
    'kv.serviceUntil': '使用时长到期',
    'kv.camOk': '#{id} 正常',
    'kv.camFault': '#{id} 故障',
    'kv.faultedYes': '是 — 不再开启新会话',
    'kv.yes': '是',
    'kv.no': '否',
    'kv.versions': '已上报 {reported} / 目标 {desired}',
    'event.appeared': '已接入',
    'event.change': '{field} {from} → {to}',
    'event.temp': '温度 {t}°C',
    'event.cameras': '摄像头正常 {ok}/{n}',
    'event.alert': '告警 {type} {state}',
    'event.alertCleared': '告警 {type} 发生，{when} 清除',
    'event.session': '会话 {id} {state}',
    'event.failure': '（{failure}）',
    'event.order': '订单 {id} {status}',
    'event.total': ' {total}',
    'field.online': '在线',
    'field.door': '门',
    'field.lock': '锁',
    'field.light': '灯带',
    'field.faulted': '故障',
    'field.locked_down': '锁柜',
    'tab.stock': '库存',
    'col.product': '商品编码',
    'col.name': '商品名称',
    'col.qty': '库存',
    'col.lowAt': '低库存阈值',
    'col.found': '发现时间',
    'col.expected': '应有',
    'col.counted': '盘点数',
    'col.difference': '差异',
    'col.restock': '补货会话',
    'col.started': '开始时间',
    'col.restocker': '补货员',
    'stock.heading': '库存',
    'stock.cabinet': '开门柜',
    'stock.cabinetId': '开门柜编号',
    'stock.show': '查看',
    'stock.pick': '请选择开门柜。',
    'stock.none': '该开门柜尚无库存记录：首次补货盘点后即有。',
    'stock.summary': '{cabinet}：{n} 种商品，{low} 种低库存',
    'stock.low': '低库存',
    'stock.lowSeen': '本页打开后降至低库存：',
    'stock.discrepancies': '未处理的库存不一致',
    'stock.discrepanciesLead': '补货盘点数与应有数不符：应有数为补货前的库存加上补货计划（无计划即为盘点）。请根据核实情况逐条处理。',
    'stock.noDiscrepancies': '暂无未处理的库存不一致。',
    'stock.note': '核实情况',
    'stock.noteLabel': '处理说明',
    'stock.resolve': '处理',
    'stock.resolving': '处理中…',
    'stock.alreadyResolved': '开门柜 {cabinet} 中商品 {sku} 的库存不一致已被处理。',
    'stock.history': '补货记录',
    'stock.historyLead': '最近的补货与盘点，最新的在前，实时更新。',
    'stock.noRestocks': '暂无补货记录。',
    'detail.stock': '库存…',
    'err.stock': '无法加载开门柜 {cabinet} 的库存：{why}',
    'err.discrepancies': '无法加载库存不一致：{why}',
    'err.restocks': '无法加载补货记录：{why}',
    'recognition.prepaid': '算法识别次数（预付）：剩余 {n} 次',
    'recognition.low': ' — 识别额度不足，请联系平台充值',
    'recognition.refused': ' — 识别额度已用完：充值前将拒绝新的购物',
    'recognition.owed': ' — 识别额度已用完：之后的识别次数将从下次充值中扣除',
    'recognition.postpaid': '算法识别次数（后付）：今日 {n} 次 · {fee}',
    'recognition.each': '（每次 {fee}）',
    'bool:true': '是',
    'bool:false': '否',
    'role:viewer': '只读',
    'role:restocker': '补货员',
    'role:operator': '运营',
    'role:merchant_admin': '商户管理员',
    'role:admin': '平台管理员',
    'door:open': '已开',
    'door:closed': '已关',
    'lock:locked': '已锁',
    'lock:unlocked': '未锁',
    'lock:fault': '故障',
    'light:on': '开',
    'light:off': '关',
    'cabinet:active': '已激活',
    'cabinet:registered': '已登记',
    'severity:critical': '严重',
    'severity:major': '重要',
    'severity:minor': '次要',
    'alert:unlock_no_ack': '开锁无应答',
    'alert:lock_not_latched': '锁未落锁',
    'alert:door_forced': '门被强开',
    'alert:door_open_too_long': '门开启过久',
    'alert:lock_fault': '锁故障',
    'alert:camera_fault': '摄像头故障',
    'alert:cabinet_offline': '开门柜离线',
    'alert:temperature_out_of_range': '温度超限',
    'alert:tamper': '防拆告警',
    'alertState:raised': '发生',
    'alertState:acked': '已确认',
    'alertState:cleared': '已清除',
    'mode:purchase': '购物',
    'mode:restock': '补货',
    'phase:unlocking': '开锁中',
    'phase:unlocked': '已开锁',
    'phase:door_open': '门已开',
    'phase:door_closed': '门已关',
    'channel:wechat': '微信支付',
    'channel:alipay': '支付宝',
    'channel:none': '无',
    'session:confirming': '待确认',
    'session:unlocking': '开锁中',
    'session:open': '进行中',
    'session:closed': '已结束',
    'session:failed': '失败',
    'failure:payment_declined': '支付未确认',
    'failure:cabinet_offline': '开门柜离线',
    'failure:unlock_timeout': '开锁超时',
    'failure:unlock_rejected': '开锁被拒',
    'failure:hub_restarted': '服务重启',
    'failure:door_never_opened': '门未打开',
    'failure:closed_by_operator': '运营关闭',
    'failure:expired': '超时关闭',
    'order:open': '进行中',
    'order:completing': '结算中',
    'order:pending_payment': '待支付',
    'order:paid': '已支付',
    'order:closed': '已关闭',
    'order:abnormal': '异常',
    'order:cancelled': '已取消',
    'order:refunded': '已退款',
    'abnormal:abnormal': '异常',
    'abnormal:recognition_failed': '识别失败',
    'abnormal:unknown_product': '未知商品',
    'abnormal:out_of_range': '超出限制',
    'abnormal:payment_complete_failed': '支付完结失败',
    'abnormal:session_timeout': '会话超时',
    'abnormal:closed_by_operator': '运营关闭',
    'abnormal:door_timeout': '门超时未关',
    'exception:amount_mismatch': '金额不符',
    'exception:app_mismatch': '应用不符',
    'exception:merchant_mismatch': '商户不符',
    'exception:state_mismatch': '状态不符',
    'exception:unknown_order': '订单不存在',
    'settlement:none': '无',
    'settlement:pending': '待分账',
    'settlement:splitting': '分账中',
    'settlement:split': '已分账',
    'settlement:processing': '处理中',
    'settlement:finished': '已完结',
    'settlement:failed': '失败',
    'settlement:returned': '已回退',
    'service:unpaid': '待支付',
    'service:paid': '已支付',
    'service:cancelled': '已取消',
  },
};

// Which language the browser asks for first, of the two the page speaks.
function browserLang() {
  const asked = navigator.languages && navigator.languages.length ? navigator.languages : [navigator.language || ''];
  for (const l of asked) {
    const s = String(l).toLowerCase();
    if (s.startsWith('zh')) return 'zh';
    if (s.startsWith('en')) return 'en';
  }
  return 'en';
}

function chosenLang() {
  const saved = localStorage.getItem(LANG_STORE);
  return saved && Object.hasOwn(I18N, saved) ? saved : browserLang();
}

function t(key, params) {
  const text = I18N[S.lang][key] ?? I18N.en[key] ?? key;
  return params ? text.replace(/\{(\w+)\}/g, (m, k) => (k in params ? String(params[k]) : m)) : text;
}

// One of the hub's own words (a state, a reason, a type) as this language says it.
function word(kind, value) {
  if (value === null || value === undefined || value === '') return value;
  return I18N[S.lang][`${kind}:${value}`] ?? String(value);
}

const locale = () => (S.lang === 'zh' ? 'zh-CN' : 'en');
const listOf = (items) => items.join(t('list.sep'));

const S = {
  lang: 'en',
  key: null,
  me: null,
  ws: null,
  lastSeq: null,
  backoff: 500,
  retryTimer: null,
  everLive: false,
  cabinets: new Map(),
  sessions: new Map(),
  orders: new Map(),
  abnormal: new Map(),
  exceptions: new Map(),
  settlements: new Map(),
  expiring: new Map(),
  events: new Map(),
  discrepancies: new Map(),
  restocks: new Map(),
  stock: null,
  stockLow: new Map(),
  recognition: null,
  tab: 'fleet',
  filter: 'all',
  search: '',
  sort: 'severity',
  view: [],
  detail: null,
  dirty: { fleet: true, alerts: true, sessions: true, abnormal: true, exceptions: true, settlements: true, stock: true, detail: true },
  frame: 0,
  lastFleetCompute: 0,
};

const $ = (id) => document.getElementById(id);

// Builds an element; strings become text nodes, so nothing from the wire is parsed as markup.
// `data-no-i18n` marks an element whose text is data (an id, a name, the hub's or a provider's
// own message), the same in every language.
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k.startsWith('data-')) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  translate(e);
  return e;
}

// An element's data-i18n* attributes name the keys of its text, placeholder, label and title.
function translate(n) {
  const d = n.dataset;
  if (!d) return;
  if (d.i18n) n.textContent = t(d.i18n);
  if (d.i18nPlaceholder) n.setAttribute('placeholder', t(d.i18nPlaceholder));
  if (d.i18nAriaLabel) n.setAttribute('aria-label', t(d.i18nAriaLabel));
  if (d.i18nTitle) n.setAttribute('title', t(d.i18nTitle));
  if (d.i18nAlt) n.setAttribute('alt', t(d.i18nAlt));
}

// Text that outlives a render (a message, a banner, a card with a form being typed in) keeps
// the function that says it, so a change of language can say it again; null empties it.
function live(node, say) {
  if (!say) {
    delete node.liveText;
    node.removeAttribute('data-live');
    node.textContent = '';
    return node;
  }
  node.liveText = say;
  node.setAttribute('data-live', '');
  node.replaceChildren(...[say()].flat());
  return node;
}

function applyI18n() {
  for (const n of document.querySelectorAll('[data-i18n], [data-i18n-placeholder], [data-i18n-aria-label], [data-i18n-title], [data-i18n-alt]')) translate(n);
  for (const n of document.querySelectorAll('[data-live]')) if (n.liveText) n.replaceChildren(...[n.liveText()].flat());
}

function setLang(lang, remember) {
  S.lang = Object.hasOwn(I18N, lang) ? lang : 'en';
  if (remember) localStorage.setItem(LANG_STORE, S.lang);
  document.documentElement.lang = S.lang === 'zh' ? 'zh-CN' : 'en';
  for (const s of document.querySelectorAll('select.lang')) s.value = S.lang;
  applyI18n();
  if (S.me) rerender();
}

// Everything drawn from data is drawn again in the new language.
function rerender() {
  renderWho();
  renderReadiness();
  renderExpiring();
  renderRecognition();
  renderServiceOrders();
  renderDetailOrders();
  if (S.bill) renderBill(S.bill.bill, S.bill.stats);
  markAll();
  S.dirty.sessions = S.dirty.abnormal = S.dirty.exceptions = S.dirty.settlements = S.dirty.stock = true;
  S.lastFleetCompute = 0;
  schedule();
}

const fen = (n) => (n === null || n === undefined ? '–' : '¥' + (n / 100).toFixed(2));
function when(t) {
  if (t === null || t === undefined) return '–';
  const d = new Date(t);
  return isNaN(d) ? String(t) : d.toLocaleString(locale());
}
function clock(t) {
  const d = new Date(t);
  return isNaN(d) ? '' : d.toLocaleTimeString(locale());
}

// ---- HTTP ----------------------------------------------------------------------------------

async function api(method, path, body) {
  const opts = { method, headers: { Authorization: 'Bearer ' + S.key } };
  if (body !== undefined) {
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (_) { data = null; }
  if (r.status === 401) {
    signOut('signin.refused');
    throw new Error('unauthorized');
  }
  if (!r.ok) {
    // The hub answers `{"error": {"code", "message"}}`.
    const e = data && data.error && typeof data.error === 'object' ? data.error : data;
    const msg = (e && (e.message || e.error || e.code)) || r.statusText;
    const err = new Error(`${r.status}: ${msg}`);
    err.status = r.status;
    err.code = e && e.code;
    throw err;
  }
  return data;
}

// `say` returns the message, so that it can be said again in another language.
let bannerShown = 0;
function banner(say) {
  const b = $('banner');
  const mine = ++bannerShown;
  live(b, say);
  b.hidden = !say;
  if (say) setTimeout(() => { if (bannerShown === mine) b.hidden = true; }, 8000);
}

// The hub's own message is passed on as it is: it names ids and codes a person can look up.
function explain(e) {
  if (e.status === 403) return t('err.forbidden');
  return e.message;
}

// ---- sign-in ---------------------------------------------------------------------------------

async function signIn(key, remember) {
  S.key = key;
  let me;
  try {
    me = await api('GET', '/api/v1/me');
  } catch (e) {
    S.key = null;
    live($('signin-error'), () => (e.message === 'unauthorized' ? t('signin.unknown') : t('signin.unreachable', { why: e.message })));
    return;
  }
  S.me = me;
  (remember ? localStorage : sessionStorage).setItem(KEY_STORE, key);
  $('signin').hidden = true;
  $('app').hidden = false;
  renderWho();
  // A merchant's key has one merchant's bills; the platform names one.
  $('bill-merchant-label').hidden = Boolean(me.merchant_id);
  connect();
  loadOrders();
  loadExpiring();
  loadReadiness();
  $('service-merchant-label').hidden = Boolean(me.merchant_id);
  loadServiceOrders();
  loadDiscrepancies();
  loadRecognition();
  // The feed tells only when the quota runs low or out; today's count moves with every visit.
  clearInterval(S.recognitionTimer);
  if (me.merchant_id) S.recognitionTimer = setInterval(loadRecognition, 60000);
}

function renderWho() {
  const me = S.me;
  if (!me) return;
  $('who').textContent = `${word('role', me.role)} · ${me.merchant_id || t('who.platform')}`;
}

// A merchant's key sees whether its shoppers can pay: each channel ready, or what the platform
// still has to set up with the provider (sub-merchant number, authorisation, service phone).
async function loadReadiness() {
  S.readiness = null;
  if (S.me && S.me.merchant_id) {
    try { S.readiness = await api('GET', `/api/v1/merchants/${encodeURIComponent(S.me.merchant_id)}/payment`); } catch (e) { S.readiness = null; }
  }
  renderReadiness();
}

function renderReadiness() {
  const box = $('payready');
  const v = S.readiness;
  if (!v) { box.hidden = true; return; }
  box.textContent = '';
  for (const name of ['wechat', 'alipay']) {
    const r = v.readiness[name];
    const missing = listOf(r.missing.map((m) => (I18N.en[`need.${m}`] ? t(`need.${m}`) : m)));
    let text = t(r.ready ? 'pay.ready' : 'pay.notReady', { channel: t(`pay.${name}`) });
    if (r.simulated) text += t('pay.simulated');
    if (missing) text += t(r.ready ? 'pay.realNeeds' : 'pay.missing', { missing });
    box.append(el('span', { class: r.ready ? 'ready' : 'notready', 'data-channel': name, text }));
  }
  box.hidden = false;
}

function signOut(reason) {
  localStorage.removeItem(KEY_STORE);
  sessionStorage.removeItem(KEY_STORE);
  S.key = null;
  S.me = null;
  S.bill = null;
  S.readiness = null;
  S.recognition = null;
  clearInterval(S.recognitionTimer);
  clearTimeout(S.stockTimer);
  S.stock = null;
  S.discrepancies = new Map();
  S.discrepanciesFresh = null;
  S.restocks = new Map();
  S.stockLow = new Map();
  // Kept rows hold forms; the next key may not see their discrepancies.
  $('discrepancies').replaceChildren();
  $('stock-cabinet').value = '';
  renderRecognition();
  if (S.ws) { S.ws.onclose = null; S.ws.close(); S.ws = null; }
  clearTimeout(S.retryTimer);
  S.lastSeq = null;
  S.cabinets.clear(); S.sessions.clear(); S.orders.clear(); S.abnormal.clear(); S.exceptions.clear(); S.settlements.clear(); S.expiring.clear(); S.events.clear();
  $('app').hidden = true;
  $('signin').hidden = false;
  live($('signin-error'), reason ? () => t(reason) : null);
}

// ---- the feed --------------------------------------------------------------------------------

function setConn(state, say) {
  const c = $('conn');
  c.dataset.state = state;
  live(c, say);
}

// A browser cannot put the key in the socket's Authorization header, and a key in the URL
// would land in logs: the page trades it (in a header) for a single-use ticket first.
async function connect() {
  if (!S.key) return;
  const again = S.everLive;
  setConn('connecting', () => t(again ? 'conn.reconnecting' : 'conn.connecting'));
  let ticket;
  try {
    ticket = (await api('POST', '/api/v1/feed-tickets')).ticket;
  } catch (e) {
    if (e.message === 'unauthorized') return;
    scheduleReconnect();
    return;
  }
  if (!S.key) return;
  const proto = location.protocol === 'https:' ? 'wss' : 'ws';
  let url = `${proto}://${location.host}/ws?ticket=${encodeURIComponent(ticket)}`;
  if (S.lastSeq !== null) url += `&since=${S.lastSeq}`;
  const ws = new WebSocket(url);
  S.ws = ws;
  ws.onopen = () => {
    S.backoff = 500;
    S.everLive = true;
    setConn('live', () => t('conn.live'));
  };
  ws.onmessage = (m) => {
    let ev;
    try { ev = JSON.parse(m.data); } catch (_) { return; }
    handle(ev);
  };
  ws.onclose = (ev) => {
    if (S.ws !== ws) return;
    S.ws = null;
    if (ev.code === 4401) {
      signOut('signin.revoked');
      return;
    }
    scheduleReconnect();
  };
}

function scheduleReconnect() {
  const wait = S.backoff;
  S.backoff = Math.min(S.backoff * 2, 10000);
  let left = Math.ceil(wait / 1000);
  const down = () => t('conn.down', { n: left });
  setConn('down', down);
  const tick = setInterval(() => {
    left -= 1;
    if (left > 0 && !S.ws) setConn('down', down);
  }, 1000);
  S.retryTimer = setTimeout(async () => {
    clearInterval(tick);
    // A refused handshake looks like any other close; ask the API whether the key still works.
    try { await api('GET', '/api/v1/me'); } catch (e) { if (e.message === 'unauthorized') return; }
    connect();
  }, wait);
}

// `sig` tells one event from another whatever the language; `say` words it.
function logEvent(cabinetId, sig, say) {
  if (!cabinetId) return;
  let list = S.events.get(cabinetId);
  if (!list) { list = []; S.events.set(cabinetId, list); }
  list.unshift({ at: Date.now(), sig, say });
  if (list.length > MAX_EVENTS) list.length = MAX_EVENTS;
  if (S.detail === cabinetId) S.dirty.detail = true;
}

const CHANGE_KIND = { online: 'bool', door: 'door', lock: 'lock', light: 'light', faulted: 'bool', locked_down: 'bool' };

// What changed, as a function that words it (null when nothing worth logging did).
function describeChange(before, after) {
  if (!before) return () => t('event.appeared');
  const parts = [];
  for (const k of Object.keys(CHANGE_KIND)) {
    if (before[k] !== after[k] && after[k] !== undefined) {
      const [from, to] = [before[k], after[k]];
      parts.push(() => t('event.change', { field: t(`field.${k}`), from: word(CHANGE_KIND[k], from) ?? '–', to: word(CHANGE_KIND[k], to) ?? '–' }));
    }
  }
  if (before.temp_c !== after.temp_c && after.temp_c !== undefined && Math.abs((before.temp_c ?? 0) - (after.temp_c ?? 0)) >= 0.5) {
    const temp = after.temp_c;
    parts.push(() => t('event.temp', { t: temp }));
  }
  const camsOk = (c) => (c.cameras || []).filter((x) => x.ok).length;
  if (camsOk(before) !== camsOk(after)) {
    const [ok, n] = [camsOk(after), (after.cameras || []).length];
    parts.push(() => t('event.cameras', { ok, n }));
  }
  return parts.length ? () => listOf(parts.map((p) => p())) : null;
}

function handle(ev) {
  if (typeof ev.seq === 'number') S.lastSeq = ev.seq;
  const d = ev.data || {};
  switch (ev.type) {
    case 'snapshot': {
      S.cabinets.clear();
      for (const c of d.cabinets || []) S.cabinets.set(c.id, c);
      markAll();
      break;
    }
    case 'cabinet': {
      const before = S.cabinets.get(d.id);
      const say = describeChange(before, d);
      S.cabinets.set(d.id, Object.assign({}, before || {}, d));
      if (say) logEvent(d.id, null, say);
      markAll();
      break;
    }
    case 'alert': {
      const c = S.cabinets.get(d.cabinet_id);
      const a = d.alert || {};
      if (c) {
        const rest = (c.alerts || []).filter((x) => x.id !== a.id);
        c.alerts = d.state === 'cleared' ? rest : rest.concat([Object.assign({}, a, { acked: a.acked || d.state === 'acked' })]);
      }
      logEvent(d.cabinet_id, `alert ${a.type} ${d.state}`, () => t('event.alert', { type: word('alert', a.type), state: word('alertState', d.state) }));
      markAll();
      break;
    }
    case 'session': {
      S.sessions.set(d.id, d);
      trim(S.sessions, MAX_SESSIONS);
      if (d.mode === 'restock') {
        keepRestock(d, true);
        // The restock's count replaces the cabinet's stock; read again a little later too,
        // should the count be stored after the session is seen closed.
        if (d.state === 'closed') {
          stockMayHaveChanged(d.cabinet_id);
          setTimeout(() => stockMayHaveChanged(d.cabinet_id), 2000);
        }
        S.dirty.stock = true;
      }
      logEvent(d.cabinet_id, null, () => t('event.session', { id: d.id.slice(0, 8), state: word('session', d.state) })
        + (d.failure ? t('event.failure', { failure: word('failure', d.failure) }) : ''));
      S.dirty.sessions = true;
      break;
    }
    case 'order': {
      S.orders.set(d.id, d);
      trim(S.orders, MAX_ORDERS);
      if (d.status === 'abnormal') S.abnormal.set(d.id, d); else S.abnormal.delete(d.id);
      logEvent(d.cabinet_id, null, () => t('event.order', { id: d.id.slice(0, 8), status: word('order', d.status) })
        + (d.total_fen != null ? t('event.total', { total: fen(d.total_fen) }) : ''));
      S.dirty.sessions = true;
      S.dirty.abnormal = true;
      stockMayHaveChanged(d.cabinet_id);
      break;
    }
    case 'stock_low': {
      stockLow(d);
      break;
    }
    case 'stock_discrepancy': {
      if (d.state === 'open') S.discrepancies.set(d.id, d); else S.discrepancies.delete(d.id);
      if (S.discrepanciesFresh) S.discrepanciesFresh.set(d.id, d);
      stockMayHaveChanged(d.cabinet_id);
      S.dirty.stock = true;
      break;
    }
    case 'recognition_quota': {
      if (S.recognition && S.recognition.merchant_id === d.merchant_id) {
        S.recognition = Object.assign({}, S.recognition, { quota_left: d.quota_left, low: true });
        renderRecognition();
      }
      if (S.me && S.me.merchant_id === d.merchant_id) loadRecognition();
      break;
    }
    case 'payment_exception': {
      S.exceptions.set(d.id, d);
      trim(S.exceptions, MAX_ORDERS);
      S.dirty.exceptions = true;
      break;
    }
    case 'service_expiring': {
      S.expiring.set(d.cabinet_id, { id: d.cabinet_id, days: d.days_left });
      renderExpiring();
      break;
    }
    case 'service_order': {
      serviceOrderChanged(d);
      break;
    }
    case 'settlement': {
      // Re-inserted so the most recently changed stay when the map is trimmed.
      S.settlements.delete(d.order_id);
      S.settlements.set(d.order_id, d);
      trim(S.settlements, MAX_ORDERS);
      S.dirty.settlements = true;
      break;
    }
    default:
      break;
  }
  schedule();
}

function trim(map, max) {
  while (map.size > max) map.delete(map.keys().next().value);
}

function markAll() {
  S.dirty.fleet = S.dirty.alerts = S.dirty.detail = true;
}

async function loadOrders() {
  try {
    const [recent, abnormal, exceptions, underway, settlements, failed] = await Promise.all([
      api('GET', '/api/v1/orders?limit=100'),
      api('GET', '/api/v1/orders?status=abnormal&limit=500'),
      api('GET', '/api/v1/payment-exceptions?limit=200'),
      api('GET', '/api/v1/sessions?limit=' + MAX_SESSIONS),
      api('GET', '/api/v1/settlements?limit=200'),
      api('GET', '/api/v1/settlements?state=failed&limit=500'),
    ]);
    // Every failed one, then the most recent; a feed event may already be newer.
    for (const x of [...(failed.items || []), ...(settlements.items || []).slice().reverse()]) {
      if (!S.settlements.has(x.order_id)) S.settlements.set(x.order_id, x);
    }
    // Sessions under way since before the page opened (a stuck one among them).
    for (const x of underway.items || []) {
      if (!S.sessions.has(x.id)) S.sessions.set(x.id, x);
      if (x.mode === 'restock') keepRestock(x, false);
    }
    // Newest first from the API: inserted oldest first, so the newest stay when trimmed.
    for (const x of (exceptions.items || []).slice().reverse()) if (!S.exceptions.has(x.id)) S.exceptions.set(x.id, x);
    // Oldest first, so the newest stay when the map is trimmed; feed events may already be newer.
    for (const o of (recent.items || []).slice().reverse()) if (!S.orders.has(o.id)) S.orders.set(o.id, o);
    for (const o of abnormal.items || []) if (!S.abnormal.has(o.id)) S.abnormal.set(o.id, o);
    S.dirty.sessions = S.dirty.abnormal = S.dirty.exceptions = S.dirty.settlements = S.dirty.stock = true;
    schedule();
  } catch (e) {
    banner(() => t('err.orders', { why: explain(e) }));
  }
}

// ---- rendering -------------------------------------------------------------------------------

function schedule() {
  if (S.frame) return;
  S.frame = requestAnimationFrame(render);
}

function render() {
  S.frame = 0;
  if (S.dirty.fleet) {
    // Sorting 10,000 rows on every event would starve the page under an alert storm; at most
    // every 150 ms is still well inside the one-second promise.
    const since = performance.now() - S.lastFleetCompute;
    if (since < 150) {
      setTimeout(schedule, 150 - since);
    } else {
      S.lastFleetCompute = performance.now();
      computeFleet();
      renderCounts();
      renderRows();
      S.dirty.fleet = false;
    }
  }
  if (S.dirty.alerts) { renderAlerts(); S.dirty.alerts = false; }
  if (S.dirty.sessions && S.tab === 'sessions') { renderSessions(); S.dirty.sessions = false; }
  if (S.dirty.abnormal) { renderAbnormal(); S.dirty.abnormal = false; }
  if (S.dirty.exceptions) { renderExceptions(); S.dirty.exceptions = false; }
  // The table only while it is shown (a busy fleet moves a settlement three times an order);
  // the count of failed ones always.
  if (S.dirty.settlements) {
    settlementsCount();
    if (S.tab === 'settlements') { renderSettlements(); S.dirty.settlements = false; }
  }
  // The open discrepancies (and the tab's count) always: they are few and keep their forms.
  if (S.dirty.stock) {
    renderDiscrepancies();
    if (S.tab === 'stock') { renderStock(); renderRestocks(); S.dirty.stock = false; }
  }
  if (S.dirty.detail && S.detail) { renderDetail(); S.dirty.detail = false; }
}

function severityOf(c) {
  let s = 0;
  for (const a of c.alerts || []) s = Math.max(s, SEVERITY_RANK[a.severity] || 0);
  return s;
}

function matches(c) {
  switch (S.filter) {
    case 'online': if (!c.online) return false; break;
    case 'offline': if (c.online) return false; break;
    case 'alerting': if (!(c.alerts && c.alerts.length)) return false; break;
    case 'faulted': if (!(c.faulted || c.locked_down)) return false; break;
    case 'session': if (!c.session) return false; break;
    default: break;
  }
  if (S.search) {
    const q = S.search;
    return c.id.toLowerCase().includes(q) || (c.point || '').toLowerCase().includes(q);
  }
  return true;
}

function computeFleet() {
  const view = [];
  for (const c of S.cabinets.values()) if (matches(c)) view.push(c);
  const byId = (a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
  const cmp = {
    severity: (a, b) => severityOf(b) - severityOf(a) || (a.online === b.online ? 0 : a.online ? 1 : -1) || byId(a, b),
    id: byId,
    temp: (a, b) => (b.temp_c ?? -999) - (a.temp_c ?? -999) || byId(a, b),
    seen: (a, b) => String(b.last_seen_at || '').localeCompare(String(a.last_seen_at || '')) || byId(a, b),
  }[S.sort];
  view.sort(cmp);
  S.view = view;
}

function renderCounts() {
  let online = 0, alerting = 0, faulted = 0, session = 0, alerts = 0;
  for (const c of S.cabinets.values()) {
    if (c.online) online++;
    if (c.alerts && c.alerts.length) { alerting++; alerts += c.alerts.filter((a) => !a.acked).length; }
    if (c.faulted || c.locked_down) faulted++;
    if (c.session) session++;
  }
  $('c-total').textContent = S.cabinets.size;
  $('c-online').textContent = online;
  $('c-offline').textContent = S.cabinets.size - online;
  $('c-alerting').textContent = alerting;
  $('c-faulted').textContent = faulted;
  $('c-session').textContent = session;
  $('tab-alerts-count').textContent = alerts ? String(alerts) : '';
  $('shown').textContent = t('fleet.shown', { n: S.view.length });
}

function cabinetRow(c) {
  const cams = c.cameras || [];
  const camsOk = cams.filter((x) => x.ok).length;
  const sev = severityOf(c);
  const sevName = sev === 3 ? 'critical' : sev === 2 ? 'major' : sev === 1 ? 'minor' : '';
  return el('div', { class: 'row' + (sevName ? ' sev-' + sevName : ''), 'data-cabinet': c.id, onclick: () => openDetail(c.id) },
    el('span', { 'data-no-i18n': '', text: c.id, title: c.id }),
    el('span', { 'data-no-i18n': '', text: c.point || '', title: c.point || '' }),
    el('span', {}, el('i', { class: 'dot' + (c.online ? ' on' : '') }), c.online ? t('online') : t('offline')),
    el('span', { class: c.door === 'open' ? 'warn' : '', text: word('door', c.door) || '–' }),
    el('span', { class: c.lock === 'fault' || c.lock === 'unlocked' ? 'warn' : '', text: word('lock', c.lock) || '–' }),
    el('span', { class: cams.length && camsOk < cams.length ? 'warn' : '', text: cams.length ? t('cams.ok', { ok: camsOk, n: cams.length }) : '–' }),
    el('span', { text: c.temp_c === null || c.temp_c === undefined ? '–' : `${c.temp_c}°C` }),
    el('span', { text: word('light', c.light) || '–' }),
    el('span', {}, (c.alerts || []).map((a) => el('span', { class: `badge ${a.severity}${a.acked ? ' acked' : ''}`, text: word('alert', a.type), title: a.type }))),
    el('span', { text: c.session ? `${word('mode', c.session.mode)} ${word('phase', c.session.phase)}` : '' }),
  );
}

function renderRows() {
  const vp = $('fleet');
  $('fleet-spacer').style.height = `${S.view.length * ROW_H}px`;
  const first = Math.max(0, Math.floor(vp.scrollTop / ROW_H) - 5);
  const count = Math.ceil(vp.clientHeight / ROW_H) + 10;
  const rows = $('fleet-rows');
  rows.style.transform = `translateY(${first * ROW_H}px)`;
  rows.replaceChildren(...S.view.slice(first, first + count).map(cabinetRow));
}

function allAlerts() {
  const out = [];
  for (const c of S.cabinets.values()) for (const a of c.alerts || []) out.push(Object.assign({ cabinet_id: c.id }, a));
  out.sort((a, b) => (SEVERITY_RANK[b.severity] || 0) - (SEVERITY_RANK[a.severity] || 0)
    || (a.acked === b.acked ? 0 : a.acked ? 1 : -1)
    || String(b.raised_at).localeCompare(String(a.raised_at)));
  return out;
}

function alertActions(a) {
  return el('span', {},
    a.acked ? null : el('button', { 'data-action': 'ack', onclick: (e) => { e.stopPropagation(); alertAction(a, 'ack'); }, text: t('alert.ack') }),
    ' ',
    el('button', { 'data-action': 'clear', onclick: (e) => { e.stopPropagation(); alertAction(a, 'clear'); }, text: t('alert.clear') }));
}

async function alertAction(a, what) {
  try {
    await api('POST', `/api/v1/alerts/${encodeURIComponent(a.id)}/${what}`);
  } catch (e) {
    banner(() => t(`err.${what}`, { type: word('alert', a.type), cabinet: a.cabinet_id, why: explain(e) }));
  }
}

function renderAlerts() {
  const list = allAlerts();
  // An alert storm can raise thousands at once; the newest 500 of the worst are enough to act on.
  const shown = list.slice(0, 500);
  $('alerts').replaceChildren(...shown.map((a) => el('tr', { 'data-alert-id': a.id, 'data-type': a.type, 'data-cabinet': a.cabinet_id, 'data-acked': a.acked ? 'true' : 'false' },
    el('td', {}, el('span', { class: `badge ${a.severity}`, text: word('severity', a.severity) })),
    el('td', { text: word('alert', a.type), title: a.type }),
    el('td', {}, el('button', { class: 'link', 'data-no-i18n': '', onclick: () => openDetail(a.cabinet_id), text: a.cabinet_id })),
    el('td', { text: when(a.raised_at) }),
    el('td', { 'data-no-i18n': '', text: a.detail || '' }),
    el('td', { text: a.acked ? t('alert.acked') : t('alert.new') }),
    el('td', {}, alertActions(a)))));
  $('alerts-empty').hidden = list.length > 0;
}

function renderSessions() {
  const live = [...S.sessions.values()].reverse();
  $('sessions').replaceChildren(...live.slice(0, 100).map((s) => el('tr', { 'data-session': s.id },
    el('td', { 'data-no-i18n': '', text: s.id.slice(0, 12), title: s.id }),
    el('td', {}, el('button', { class: 'link', 'data-no-i18n': '', onclick: () => openDetail(s.cabinet_id), text: s.cabinet_id })),
    el('td', { 'data-no-i18n': '', text: s.user_id }), el('td', { text: word('channel', s.channel) }), el('td', { text: word('mode', s.mode) }),
    el('td', { class: s.state === 'failed' ? 'warn' : '', text: word('session', s.state) + (s.failure ? ` (${word('failure', s.failure)})` : '') }),
    el('td', { text: when(s.updated_at) }),
    el('td', {}, UNDERWAY.has(s.state)
      ? el('button', { class: 'link', 'data-close': s.id, onclick: () => askClose(s.id), text: t('close.open') })
      : null))));
  const orders = [...S.orders.values()].sort((a, b) => String(b.updated_at).localeCompare(String(a.updated_at)));
  $('orders').replaceChildren(...orders.slice(0, 100).map(orderRow));
}

function renderExceptions() {
  const list = [...S.exceptions.values()].sort((a, b) => Number(b.created_at) - Number(a.created_at));
  $('tab-exceptions-count').textContent = list.length ? String(list.length) : '';
  $('exceptions').replaceChildren(...list.map((x) => el('tr', { 'data-exception': x.id },
    el('td', { text: when(x.created_at) }), el('td', { text: word('channel', x.provider) }),
    el('td', { class: 'warn', text: word('exception', x.reason), title: x.reason }),
    el('td', { 'data-no-i18n': '', text: x.order_id ? x.order_id.slice(0, 12) : '—', title: x.order_id || '' }),
    el('td', { 'data-no-i18n': '', text: x.notification_id }), el('td', { 'data-no-i18n': '', text: x.detail }))));
  $('exceptions-empty').hidden = list.length > 0;
}

function settlementsCount() {
  let failed = 0;
  for (const x of S.settlements.values()) if (x.state === 'failed') failed += 1;
  $('tab-settlements-count').textContent = failed ? String(failed) : '';
}

function renderSettlements() {
  const list = [...S.settlements.values()].sort((a, b) => Number(b.updated_at) - Number(a.updated_at));
  $('settlements').replaceChildren(...list.map((x) => el('tr', { 'data-settlement': x.order_id },
    el('td', { text: when(x.updated_at) }),
    el('td', { 'data-no-i18n': '', text: x.order_id.slice(0, 12), title: x.order_id }),
    el('td', { class: x.state === 'failed' ? 'warn' : '', text: word('settlement', x.state) }),
    el('td', { text: (x.commission_bps / 100).toFixed(2) + ' %' }),
    el('td', { text: fen(x.platform_fen) }), el('td', { text: fen(x.merchant_fen) }),
    el('td', { text: x.returned_fen ? fen(x.returned_fen) : '—' }),
    el('td', { 'data-no-i18n': '', text: x.last_error || '' }),
    el('td', {}, ['pending', 'splitting', 'split', 'failed'].includes(x.state)
      ? el('button', { class: 'link', 'data-retry': x.order_id, onclick: () => retrySettlement(x.order_id), text: t('settlements.retry') })
      : ''))));
  $('settlements-empty').hidden = list.length > 0;
}

async function retrySettlement(orderId) {
  try {
    const row = await api('POST', `/api/v1/orders/${encodeURIComponent(orderId)}/settlement/retry`, {});
    S.settlements.set(row.order_id, row);
    S.dirty.settlements = true;
    schedule();
  } catch (e) {
    banner(() => t('err.retry', { why: explain(e) }));
  }
}

// ---- stock (库存) ------------------------------------------------------------------------------

const MAX_RESTOCKS = 100;
const MAX_LOW_SEEN = 30;
const stockKey = (cabinet, sku) => `${cabinet}\n${sku}`;

// The restocks seen (the hub's history, or over the feed), by id. A feed event is newer than
// any lookup.
function keepRestock(x, newer) {
  if (!newer && S.restocks.has(x.id)) return;
  S.restocks.set(x.id, x);
  if (S.restocks.size > MAX_RESTOCKS) {
    const oldest = [...S.restocks.values()].sort((a, b) => Number(a.created_at) - Number(b.created_at));
    for (const o of oldest.slice(0, S.restocks.size - MAX_RESTOCKS)) S.restocks.delete(o.id);
  }
}

// Stock falls with every purchase but the feed tells only the fall to the low mark: the cabinet
// on show is read again, at most once per burst of its events.
function stockMayHaveChanged(cabinetId) {
  if (!S.stock || S.stock.cabinet !== cabinetId || S.tab !== 'stock') return;
  clearTimeout(S.stockTimer);
  S.stockTimer = setTimeout(() => loadStock(cabinetId), 300);
}

function applyStockRow(data, d) {
  let i = data.items.find((x) => x.sku === d.sku);
  if (!i) {
    i = { sku: d.sku, name: null };
    data.items.push(i);
    data.items.sort((a, b) => (a.sku < b.sku ? -1 : a.sku > b.sku ? 1 : 0));
  }
  Object.assign(i, { qty: d.qty, low_at: d.low_at, low: d.qty <= d.low_at, updated_at: d.updated_at });
  data.low = data.items.filter((x) => x.low).length;
}

// A product fell to its low mark, or (`state: "cleared"`) a count lifted it above again.
function stockLow(d) {
  const k = stockKey(d.cabinet_id, d.sku);
  S.stockLow.delete(k);
  if (d.state !== 'cleared' && d.qty <= d.low_at) {
    S.stockLow.set(k, d);
    trim(S.stockLow, MAX_LOW_SEEN);
  }
  const data = S.stock && S.stock.cabinet === d.cabinet_id && S.stock.data;
  if (data) applyStockRow(data, d);
  stockMayHaveChanged(d.cabinet_id);
  S.dirty.stock = true;
}

async function loadStock(id) {
  // A refresh leaves the field alone: the operator may be typing the next cabinet's id.
  if (!S.stock || S.stock.cabinet !== id) {
    S.stock = { cabinet: id, data: null };
    $('stock-cabinet').value = id;
  }
  const asked = S.stock;
  S.dirty.stock = true;
  schedule();
  try {
    const v = await api('GET', `/api/v1/cabinets/${encodeURIComponent(id)}/stock`);
    if (S.stock !== asked) return;
    v.items = v.items || [];
    // A stock_low that overtook this answer is newer than what it says; one the answer has
    // since seen restocked is no longer news.
    for (const i of [...v.items]) {
      const k = stockKey(id, i.sku), seen = S.stockLow.get(k);
      if (!seen) continue;
      const at = Date.parse(i.updated_at);
      if (Number(seen.updated_at) > at) applyStockRow(v, seen);
      else if (!i.low) S.stockLow.delete(k);
    }
    asked.data = v;
  } catch (e) {
    if (S.stock !== asked || e.message === 'unauthorized') return;
    asked.data = null;
    banner(() => t('err.stock', { cabinet: id, why: explain(e) }));
  }
  S.dirty.stock = true;
  schedule();
}

function showStockOf(id) {
  if (!id) return;
  if (S.tab !== 'stock') {
    if (!S.stock || S.stock.cabinet !== id) S.stock = { cabinet: id, data: null };
    $('stock-cabinet').value = id;
    showTab('stock');
  } else {
    loadStock(id);
  }
}

// Each visit reads the lists again: a discrepancy resolved on another page is not on the feed.
function openStock() {
  loadDiscrepancies();
  loadRestockHistory();
  if (S.stock) loadStock(S.stock.cabinet);
}

async function loadDiscrepancies() {
  // What the feed (or this page) says while the list is read is newer than the list.
  const fresh = new Map();
  S.discrepanciesFresh = fresh;
  try {
    const v = await api('GET', '/api/v1/stock-discrepancies?state=open&limit=1000');
    if (S.discrepanciesFresh !== fresh) return;
    const open = new Map((v.items || []).map((d) => [d.id, d]));
    for (const [id, d] of fresh) if (d.state === 'open') open.set(id, d); else open.delete(id);
    S.discrepancies = open;
    S.dirty.stock = true;
    schedule();
  } catch (e) {
    if (S.discrepanciesFresh === fresh && e.message !== 'unauthorized') banner(() => t('err.discrepancies', { why: explain(e) }));
  } finally {
    if (S.discrepanciesFresh === fresh) S.discrepanciesFresh = null;
  }
}

// The restock history: the hub's latest restock sessions, whatever their state.
async function loadRestockHistory() {
  let v;
  try {
    v = await api('GET', `/api/v1/restocks?limit=${MAX_RESTOCKS}`);
  } catch (e) {
    if (e.message !== 'unauthorized') banner(() => t('err.restocks', { why: explain(e) }));
    return;
  }
  if (!S.me) return;
  for (const x of v.items || []) keepRestock(x, false);
  S.dirty.stock = true;
  schedule();
}

function renderStock() {
  const st = S.stock, data = st && st.data, items = (data && data.items) || [];
  $('stock-items').replaceChildren(...items.map((i) => el('tr', { 'data-stock-sku': i.sku, 'data-low': i.low ? 'true' : 'false', class: i.low ? 'low' : '' },
    el('td', { 'data-no-i18n': '', text: i.sku }),
    el('td', { 'data-no-i18n': '', text: i.name || '' }),
    el('td', { class: i.low ? 'warn' : '', text: String(i.qty) }),
    el('td', { text: String(i.low_at) }),
    el('td', {}, i.low ? el('span', { class: 'badge major', text: t('stock.low') }) : null),
    el('td', { text: when(i.updated_at) }))));
  const empty = $('stock-empty');
  empty.dataset.i18n = data ? 'stock.none' : 'stock.pick';
  translate(empty);
  empty.hidden = items.length > 0;
  live($('stock-summary'), data ? () => t('stock.summary', { cabinet: data.cabinet_id, n: data.items.length, low: data.low }) : null);
  const seen = [...S.stockLow.values()].reverse();
  const box = $('stock-low-seen');
  box.hidden = seen.length === 0;
  box.replaceChildren(...(seen.length ? [t('stock.lowSeen'), ...seen.map((d) => el('button', {
    class: 'link', 'data-no-i18n': '', 'data-low-stock': `${d.cabinet_id}/${d.sku}`,
    text: `${d.cabinet_id} · ${d.sku} · ${d.qty}`, onclick: () => showStockOf(d.cabinet_id),
  }))] : []));
}

function renderDiscrepancies() {
  const list = [...S.discrepancies.values()].sort((a, b) => Number(b.created_at) - Number(a.created_at) || (a.id < b.id ? -1 : 1));
  $('tab-stock-count').textContent = list.length ? String(list.length) : '';
  const body = $('discrepancies');
  // Rows hold forms being typed in: only added, removed and put in order, never redrawn.
  const have = new Map([...body.children].map((n) => [n.dataset.discrepancy, n]));
  for (const [id, node] of have) if (!S.discrepancies.has(id)) node.remove();
  let prev = null;
  for (const d of list) {
    const node = have.get(d.id) || discrepancyRow(d);
    const at = prev ? prev.nextSibling : body.firstChild;
    if (node !== at) body.insertBefore(node, at);
    prev = node;
  }
  $('discrepancies-empty').hidden = list.length > 0;
}

function discrepancyRow(d) {
  const msg = el('span', { class: 'muted', role: 'status' });
  const note = el('input', {
    name: 'note', maxLength: 200, required: true, pattern: '.*\\S.*', autocomplete: 'off',
    'data-i18n-placeholder': 'stock.note', 'data-i18n-aria-label': 'stock.noteLabel',
  });
  const form = el('form', { class: 'resolve', onsubmit: (e) => { e.preventDefault(); resolveDiscrepancy(d, note.value.trim(), msg); } },
    note, ' ', el('button', { type: 'submit', 'data-i18n': 'stock.resolve' }), ' ', msg);
  const diff = d.counted - d.expected;
  return el('tr', { 'data-discrepancy': d.id, 'data-cabinet': d.cabinet_id, 'data-sku': d.sku },
    live(el('td'), () => when(d.created_at)),
    el('td', {}, el('button', { class: 'link', 'data-no-i18n': '', text: d.cabinet_id, onclick: () => showStockOf(d.cabinet_id) })),
    el('td', { 'data-no-i18n': '', text: d.sku }),
    el('td', { text: String(d.expected) }),
    el('td', { text: String(d.counted) }),
    el('td', { class: 'warn', text: diff > 0 ? `+${diff}` : String(diff) }),
    el('td', { 'data-no-i18n': '', text: d.session_id.slice(0, 12), title: d.session_id }),
    el('td', {}, form));
}

async function resolveDiscrepancy(d, note, msg) {
  if (!note) return;
  live(msg, () => t('stock.resolving'));
  let done;
  try {
    done = await api('POST', `/api/v1/stock-discrepancies/${encodeURIComponent(d.id)}/resolve`, { note });
  } catch (err) {
    if (err.code !== 'already_resolved' && err.status !== 409) {
      live(msg, () => explain(err));
      return;
    }
    banner(() => t('stock.alreadyResolved', { sku: d.sku, cabinet: d.cabinet_id }));
    done = Object.assign({}, d, { state: 'resolved' });
  }
  S.discrepancies.delete(d.id);
  if (S.discrepanciesFresh) S.discrepanciesFresh.set(d.id, done);
  S.dirty.stock = true;
  schedule();
}

function renderRestocks() {
  const list = [...S.restocks.values()].sort((a, b) => Number(b.created_at) - Number(a.created_at));
  $('restocks').replaceChildren(...list.map((x) => el('tr', { 'data-restock': x.id, 'data-state': x.state },
    el('td', { text: when(x.created_at) }),
    el('td', {}, el('button', { class: 'link', 'data-no-i18n': '', text: x.cabinet_id, onclick: () => showStockOf(x.cabinet_id) })),
    el('td', { 'data-no-i18n': '', text: x.user_id }),
    el('td', { class: x.state === 'failed' ? 'warn' : '', text: word('session', x.state) + (x.failure ? ` (${word('failure', x.failure)})` : '') }),
    el('td', { text: when(x.updated_at) }))));
  $('restocks-empty').hidden = list.length > 0;
}

// ---- recognition billing (算法识别次数) --------------------------------------------------------

async function loadRecognition() {
  const m = S.me && S.me.merchant_id;
  if (!m) { S.recognition = null; renderRecognition(); return; }
  try {
    const v = await api('GET', `/api/v1/merchants/${encodeURIComponent(m)}/recognition`);
    if (!S.me || S.me.merchant_id !== m) return;
    S.recognition = v;
  } catch (_) {
    // What was shown stays until the next read: it is refreshed every minute.
    return;
  }
  renderRecognition();
}

// A merchant's key sees how its recognitions are paid: a prepaid quota running out refuses
// shoppers (or runs into debt), so it is shown with the other warnings.
function renderRecognition() {
  const box = $('recognition');
  const r = S.recognition;
  if (!r) {
    box.hidden = true;
    box.replaceChildren();
    for (const a of ['data-billing', 'data-quota-left', 'data-low']) box.removeAttribute(a);
    return;
  }
  box.dataset.billing = r.billing;
  box.dataset.quotaLeft = String(r.quota_left);
  box.dataset.low = r.low ? 'true' : 'false';
  if (r.billing === 'prepaid') {
    const out = r.quota_left <= 0;
    const warn = out ? t(r.when_exhausted === 'continue' ? 'recognition.owed' : 'recognition.refused') : r.low ? t('recognition.low') : '';
    box.replaceChildren(el('span', { class: out || r.low ? 'notready' : 'ready', text: t('recognition.prepaid', { n: r.quota_left }) + warn }));
  } else {
    box.replaceChildren(el('span', { text: t('recognition.postpaid', { n: r.used_today, fee: fen(r.fee_today_fen) }) + t('recognition.each', { fee: fen(r.fee_fen) }) }));
  }
  box.hidden = false;
}

// ---- service time (设备使用时长) ------------------------------------------------------------

async function loadExpiring() {
  try {
    const list = await api('GET', '/api/v1/cabinets?expiring_within_days=30');
    const now = Date.now();
    // The list is the whole answer: a cabinet renewed since leaves the banner.
    S.expiring = new Map();
    for (const c of list.items || []) {
      const end = Date.parse(c.service_expires_at);
      S.expiring.set(c.id, { id: c.id, days: Math.max(0, Math.ceil((end - now) / 86400000)) });
    }
    renderExpiring();
  } catch (e) {
    banner(() => t('err.expiring', { why: explain(e) }));
  }
}

// Who must renew: an expired cabinet refuses shoppers (service_expired).
function renderExpiring() {
  const list = [...S.expiring.values()].sort((a, b) => a.days - b.days);
  const box = $('expiring');
  box.hidden = list.length === 0;
  if (!list.length) { box.replaceChildren(); return; }
  const expired = list.filter((x) => x.days === 0).length;
  box.replaceChildren(
    el('strong', { text: expired ? t('expiring.expired', { n: expired }) : '' }),
    t('expiring.soon', { n: list.length }),
    ...list.slice(0, 20).map((x) => el('span', { class: 'pill', 'data-expiring': x.id, text: x.days ? t('expiring.days', { id: x.id, days: x.days }) : t('expiring.gone', { id: x.id }) })),
    list.length > 20 ? t('expiring.more', { n: list.length - 20 }) : '',
    ' ', el('button', { class: 'link', id: 'renew', text: t('expiring.renew'), onclick: () => {
      $('service-cabinets').value = list.map((x) => x.id).join(', ');
      showTab('service');
    } }));
}

// ---- service time ----------------------------------------------------------------------------

async function loadServiceOrders() {
  try {
    const v = await api('GET', '/api/v1/service-orders?limit=50');
    S.serviceOrders = new Map(v.items.map((o) => [o.id, o]));
    renderServiceOrders();
  } catch (e) {
    banner(() => t('err.serviceOrders', { why: explain(e) }));
  }
}

function renderServiceOrders() {
  const list = [...(S.serviceOrders || new Map()).values()].sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
  $('service-orders').replaceChildren(...list.map((o) => el('tr', { 'data-service-order': o.id, 'data-status': o.status },
    el('td', { text: when(o.created_at) }), el('td', { 'data-no-i18n': '', text: o.id }),
    el('td', { 'data-no-i18n': '', text: listOf(o.cabinet_ids) }), el('td', { text: String(o.years) }),
    el('td', { text: fen(o.amount_fen) }), el('td', { text: word('service', o.status) }),
    el('td', { 'data-no-i18n': '', text: o.transaction_id || o.voucher || '' }))));
  $('service-empty').hidden = list.length > 0;
}

// The feed's word on an order: the list, and the code being paid.
function serviceOrderChanged(d) {
  S.serviceOrders = S.serviceOrders || new Map();
  S.serviceOrders.set(d.id, d);
  renderServiceOrders();
  if (S.paying === d.id && d.status !== 'unpaid') {
    const box = $('service-pay');
    box.dataset.status = d.status;
    $('service-qr').replaceChildren();
    live($('service-pay-text'), () => (d.status === 'paid'
      ? t('service.paid', { amount: fen(d.amount_fen), years: d.years })
      : t('service.cancelled')));
    S.paying = null;
  }
  if (d.status === 'paid') loadExpiring();
}

async function buyService(e) {
  e.preventDefault();
  const body = {
    cabinet_ids: $('service-cabinets').value.split(/[\s,，]+/).filter(Boolean),
    years: Number($('service-years').value),
  };
  if (!S.me.merchant_id) body.merchant_id = $('service-merchant').value.trim();
  let o;
  try {
    o = await api('POST', '/api/v1/service-orders', body);
  } catch (err) {
    banner(() => t('err.serviceOrder', { why: explain(err) }));
    return;
  }
  S.serviceOrders = S.serviceOrders || new Map();
  S.serviceOrders.set(o.id, o);
  renderServiceOrders();
  S.paying = o.id;
  const box = $('service-pay');
  box.hidden = false;
  box.dataset.order = o.id;
  box.dataset.status = o.status;
  live($('service-pay-text'), () => t('service.scan', { amount: fen(o.amount_fen), n: o.cabinet_ids.length, years: o.years, by: when(o.pay_by) }));
  // Fetched with the key (an <img> cannot send it), then shown from memory.
  try {
    const r = await fetch(`/api/v1/service-orders/${encodeURIComponent(o.id)}/qr.svg`, { headers: { Authorization: 'Bearer ' + S.key } });
    if (r.ok && S.paying === o.id) {
      const src = URL.createObjectURL(await r.blob());
      $('service-qr').replaceChildren(el('img', { id: 'service-qr-img', src, 'data-i18n-alt': 'service.qrAlt', width: 220, height: 220 }));
    }
  } catch (err) {
    banner(() => t('err.qr', { why: err.message }));
  }
}

// ---- bills and statistics ---------------------------------------------------------------

// The hub's day is local time (+08:00 by default); the browser's is close enough for a default.
function today() {
  const d = new Date();
  return `${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, '0')}-${String(d.getDate()).padStart(2, '0')}`;
}

function billMerchant() {
  return (S.me && S.me.merchant_id) || $('bill-merchant').value.trim();
}

async function showBill(e) {
  if (e) e.preventDefault();
  const m = billMerchant(), day = $('bill-date').value;
  if (!m || !day) { banner(() => t('bill.pick')); return; }
  const base = `${encodeURIComponent(m)}/${encodeURIComponent(day)}`;
  try {
    const [bill, stats] = await Promise.all([api('GET', `/api/v1/bills/${base}`), api('GET', `/api/v1/stats/${base}`)]);
    renderBill(bill, stats);
    $('bill-download').disabled = false;
  } catch (err) {
    banner(() => t('err.bill', { why: explain(err) }));
  }
}

// data-total keeps the English name of each total: scripts and tests find a total by it.
function renderBill(bill, stats) {
  S.bill = { bill, stats };
  const sum = bill.totals;
  const kv = [
    ['orders', String(sum.orders)], ['sales', fen(sum.paid_fen)], ['average basket', fen(stats.average_basket_fen)],
    ['list price', fen(sum.gross_fen)], ['promotions', fen(sum.discount_fen)],
    ['refunded', t('total.refundedValue', { amount: fen(sum.refunded_fen), n: sum.refunds })], ['commission', fen(sum.commission_fen)],
    ['commission returned', fen(sum.commission_returned_fen)], ['commission pending', fen(sum.commission_pending_fen)],
    ['service time', fen(sum.service_fen)],
    ['net', fen(sum.net_fen)],
  ];
  $('bill-totals').replaceChildren(...kv.flatMap(([k, v]) => [el('dt', { text: t(`total.${k}`) }), el('dd', { 'data-total': k, text: v })]));
  $('bill-chart').replaceChildren(hourChart(stats.by_hour));
  $('bill-cabinets').replaceChildren(...stats.cabinets.map((c) => el('tr', { 'data-cabinet-stats': c.cabinet_id },
    el('td', { 'data-no-i18n': '', text: c.cabinet_id }), el('td', { text: String(c.orders) }), el('td', { text: fen(c.sales_fen) }),
    el('td', { 'data-no-i18n': '', text: listOf(c.top_products.map((p) => `${p.name} ×${p.qty}`)) }))));
  $('bill-empty').hidden = true;
}

// Sales by hour as SVG bars: 24 of them, the tallest the day's best hour.
function hourChart(hours) {
  const NS = 'http://www.w3.org/2000/svg';
  const w = 24 * 22, h = 140, max = Math.max(1, ...hours.map((x) => x.sales_fen));
  const svg = document.createElementNS(NS, 'svg');
  svg.setAttribute('viewBox', `0 0 ${w} ${h + 16}`);
  svg.setAttribute('class', 'chart');
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', t('bill.chartLabel'));
  for (const x of hours) {
    const bh = Math.round((x.sales_fen / max) * h);
    const r = document.createElementNS(NS, 'rect');
    r.setAttribute('x', String(x.hour * 22 + 2));
    r.setAttribute('y', String(h - bh));
    r.setAttribute('width', '18');
    r.setAttribute('height', String(bh));
    r.setAttribute('data-hour', String(x.hour));
    r.setAttribute('fill', 'currentColor');
    const tip = document.createElementNS(NS, 'title');
    tip.textContent = t('bill.hour', { hour: String(x.hour).padStart(2, '0'), orders: x.orders, sales: fen(x.sales_fen) });
    r.append(tip);
    svg.append(r);
    if (x.hour % 3 === 0) {
      const label = document.createElementNS(NS, 'text');
      label.setAttribute('x', String(x.hour * 22 + 2));
      label.setAttribute('y', String(h + 13));
      label.setAttribute('font-size', '10');
      label.textContent = String(x.hour);
      svg.append(label);
    }
  }
  return svg;
}

// The CSV needs the key, so it is fetched here and handed to the browser as a file.
async function downloadBill() {
  const m = billMerchant(), day = $('bill-date').value;
  try {
    const r = await fetch(`/api/v1/bills/${encodeURIComponent(m)}/${encodeURIComponent(day)}?format=csv`, {
      headers: { Authorization: `Bearer ${S.key}` },
    });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const blob = await r.blob();
    const a = el('a', { href: URL.createObjectURL(blob), download: `bill-${m}-${day}.csv`, id: 'bill-file', hidden: true });
    $('bill-file')?.remove();
    document.body.append(a);
    a.click();
  } catch (err) {
    banner(() => t('err.billDownload', { why: explain(err) }));
  }
}

// A session still under way can be closed by an operator (a shopper gone, a cabinet stuck
// busy). One form above the table, not one per row: the rows are redrawn on every change.
const UNDERWAY = new Set(['confirming', 'unlocking', 'open']);

function askClose(id) {
  $('close-id').textContent = id;
  live($('close-msg'), null);
  $('close-form').hidden = false;
  $('close-reason').focus();
}

async function submitClose(e) {
  e.preventDefault();
  const id = $('close-id').textContent;
  const reason = $('close-reason').value.trim();
  if (!id || !reason) return;
  try {
    const v = await api('POST', `/api/v1/sessions/${encodeURIComponent(id)}/close`, { reason });
    live($('close-msg'), () => t('close.done', { state: v.session ? word('session', v.session.state) : '' }));
    $('close-reason').value = '';
    $('close-form').hidden = true;
  } catch (err) {
    banner(() => t('err.close', { id, why: explain(err) }));
  }
}

function orderRow(o) {
  return el('tr', { 'data-order': o.id },
    el('td', { 'data-no-i18n': '', text: o.id.slice(0, 12), title: o.id }),
    el('td', { 'data-no-i18n': '', text: o.cabinet_id }), el('td', { 'data-no-i18n': '', text: o.user_id }),
    el('td', { class: o.status === 'abnormal' || o.status === 'pending_payment' ? 'warn' : '', text: word('order', o.status) }),
    el('td', { text: fen(o.total_fen) }), el('td', { text: fen(o.paid_fen) }), el('td', { text: fen(o.refunded_fen) }),
    el('td', { text: when(o.updated_at) }));
}

function renderAbnormal() {
  const list = [...S.abnormal.values()].sort((a, b) => String(a.created_at).localeCompare(String(b.created_at)));
  $('tab-abnormal-count').textContent = list.length ? String(list.length) : '';
  const box = $('abnormal');
  // Keep forms an operator is typing in: only add and remove cards.
  const have = new Map([...box.children].map((n) => [n.dataset.order, n]));
  for (const [id, node] of have) if (!S.abnormal.has(id)) node.remove();
  for (const o of list) if (!have.has(o.id)) box.append(abnormalCard(o));
  $('abnormal-empty').hidden = list.length > 0;
}

function itemLine(sku, qty) {
  return el('div', { class: 'item' },
    el('input', { name: 'sku', 'data-i18n-placeholder': 'abnormal.sku', 'data-i18n-aria-label': 'abnormal.sku', value: sku || '', required: true }),
    el('input', { name: 'qty', type: 'number', min: '1', value: String(qty || 1), required: true, 'data-i18n-aria-label': 'abnormal.qty' }),
    el('button', { type: 'button', text: '−', 'data-i18n-aria-label': 'abnormal.removeItem', onclick: (e) => e.target.parentElement.remove() }));
}

function abnormalCard(o) {
  const items = el('div', { class: 'items' }, itemLine());
  const msg = el('span', { class: 'muted', role: 'status' });
  const form = el('form', {
    onsubmit: async (e) => {
      e.preventDefault();
      const lines = [...items.querySelectorAll('.item')].map((n) => ({
        sku: n.querySelector('[name=sku]').value.trim(),
        qty: parseInt(n.querySelector('[name=qty]').value, 10),
      })).filter((l) => l.sku && l.qty > 0);
      live(msg, () => t('abnormal.resolving'));
      try {
        const r = await api('POST', `/api/v1/orders/${encodeURIComponent(o.id)}/resolve`, { items: lines });
        live(msg, () => t('abnormal.resolved', { status: r.order ? word('order', r.order.status) : 'ok' }));
      } catch (err) {
        live(msg, () => explain(err));
      }
    },
  }, items,
  el('button', { type: 'button', 'data-i18n': 'abnormal.addItem', onclick: () => items.append(itemLine()) }), ' ',
  el('button', { type: 'submit', 'data-i18n': 'abnormal.resolve' }), ' ', msg);
  return el('div', { class: 'abn', 'data-order': o.id },
    live(el('div'), () => [el('b', { 'data-no-i18n': '', text: o.id }), t('abnormal.card', { cabinet: o.cabinet_id, user: o.user_id, channel: word('channel', o.channel) }),
      el('span', { class: 'warn', text: word('abnormal', o.abnormal_reason || 'abnormal') }), ` · ${when(o.created_at)}`]),
    form);
}

// ---- cabinet detail --------------------------------------------------------------------------

async function openDetail(id) {
  S.detail = id;
  $('detail').hidden = false;
  $('d-title').textContent = id;
  live($('d-config-msg'), null);
  S.dirty.detail = true;
  schedule();
  try {
    const [cfg, hist, orders] = await Promise.all([
      api('GET', `/api/v1/cabinets/${encodeURIComponent(id)}/config`),
      api('GET', `/api/v1/alerts?cabinet_id=${encodeURIComponent(id)}&limit=20`),
      api('GET', `/api/v1/orders?cabinet_id=${encodeURIComponent(id)}&limit=10`),
    ]);
    if (S.detail !== id) return;
    fillConfig(cfg.config);
    const seen = new Set((S.events.get(id) || []).map((e) => e.sig));
    for (const a of (hist.items || []).slice().reverse()) {
      const sig = `alert ${a.type} raised${a.cleared_at ? ', cleared ' + a.cleared_at : ''}`;
      if (!seen.has(sig)) {
        logEvent(id, sig, () => (a.cleared_at
          ? t('event.alertCleared', { type: word('alert', a.type), when: when(a.cleared_at) })
          : t('event.alert', { type: word('alert', a.type), state: word('alertState', 'raised') })));
        S.events.get(id)[0].at = Date.parse(a.raised_at) || Date.now();
      }
    }
    S.detailOrders = orders.items || [];
    renderDetailOrders();
    S.dirty.detail = true;
    schedule();
  } catch (e) {
    banner(() => t('err.cabinet', { why: explain(e) }));
  }
}

function renderDetailOrders() {
  $('d-orders').replaceChildren(...(S.detailOrders || []).map((o) => el('tr', {},
    el('td', { 'data-no-i18n': '', text: o.id.slice(0, 12) }), el('td', { text: word('order', o.status) }), el('td', { text: fen(o.total_fen) }), el('td', { text: when(o.created_at) }))));
}

function fillConfig(c) {
  S.config = c;
  const f = $('d-config');
  if (!c) { live($('d-config-msg'), () => t('cfg.none')); return; }
  f.temp_target_c.value = c.temp_target_c;
  f.temp_lo.value = c.temp_range_c[0];
  f.temp_hi.value = c.temp_range_c[1];
  f.light_on.value = c.light.on;
  f.light_off.value = c.light.off;
  f.heartbeat_s.value = c.heartbeat_s;
  f.foreign_object_lock.checked = !!c.foreign_object_lock;
  live($('d-config-msg'), () => t('cfg.version', { v: c.version }));
}

async function saveConfig(e) {
  e.preventDefault();
  const f = e.target;
  const id = S.detail;
  const want = {
    temp_target_c: parseFloat(f.temp_target_c.value),
    temp_range_c: [parseFloat(f.temp_lo.value), parseFloat(f.temp_hi.value)],
    light: { on: f.light_on.value, off: f.light_off.value },
    heartbeat_s: parseInt(f.heartbeat_s.value, 10),
    foreign_object_lock: f.foreign_object_lock.checked,
  };
  // Only what the operator changed: a field someone else edited meanwhile is not overwritten.
  const body = {};
  for (const [k, v] of Object.entries(want)) {
    if (!S.config || JSON.stringify(S.config[k]) !== JSON.stringify(v)) body[k] = v;
  }
  if (!Object.keys(body).length) { live($('d-config-msg'), () => t('cfg.unchanged')); return; }
  live($('d-config-msg'), () => t('cfg.saving'));
  try {
    const r = await api('PATCH', `/api/v1/cabinets/${encodeURIComponent(id)}/config`, body);
    fillConfig(r.config);
    live($('d-config-msg'), () => t(r.pushed ? 'cfg.savedPushed' : 'cfg.savedLater', { v: r.config.version }));
  } catch (err) {
    live($('d-config-msg'), () => explain(err));
  }
}

function renderDetail() {
  const c = S.cabinets.get(S.detail);
  if (!c) { $('d-state').replaceChildren(el('span', { text: t('detail.unknown') })); return; }
  const kv = [
    ['link', c.online ? t('online') : t('offline')], ['point', c.point], ['status', word('cabinet', c.status)],
    ['door', word('door', c.door)], ['lock', word('lock', c.lock)],
    ['cameras', listOf((c.cameras || []).map((x) => t(x.ok ? 'kv.camOk' : 'kv.camFault', { id: x.id })))],
    ['temperature', c.temp_c === null || c.temp_c === undefined ? '–' : `${c.temp_c}°C`], ['light', word('light', c.light)],
    ['faulted', c.faulted ? t('kv.faultedYes') : t('kv.no')], ['lockedDown', c.locked_down ? t('kv.yes') : t('kv.no')],
    ['session', c.session ? `${c.session.id} ${word('mode', c.session.mode)} ${word('phase', c.session.phase)}` : t('detail.none')],
    ['configVersion', c.config_version ? t('kv.versions', { reported: c.config_version.reported ?? '–', desired: c.config_version.desired ?? '–' }) : '–'],
    ['firmware', c.fw], ['lastSeen', when(c.last_seen_at)], ['serviceUntil', when(c.service_expires_at)],
  ];
  $('d-state').replaceChildren(...kv.flatMap(([k, v]) => [el('span', { text: t(`kv.${k}`) }), el('span', { text: v ?? '–' })]));
  $('d-alerts').replaceChildren(...((c.alerts || []).length ? c.alerts.map((a) => el('div', { 'data-alert-id': a.id },
    el('span', { class: `badge ${a.severity}${a.acked ? ' acked' : ''}`, text: word('alert', a.type), title: a.type }), ` ${when(a.raised_at)} `,
    alertActions(Object.assign({ cabinet_id: c.id }, a)))) : [el('span', { class: 'muted', text: t('detail.none') })]));
  $('d-events').replaceChildren(...(S.events.get(c.id) || []).map((e) => el('li', { text: `${clock(e.at)} ${e.say()}` })));
}

// ---- wiring ----------------------------------------------------------------------------------

function showTab(tab) {
  S.tab = tab;
  for (const b of document.querySelectorAll('.tab')) b.classList.toggle('active', b.dataset.tab === tab);
  for (const p of document.querySelectorAll('.tabpane')) p.hidden = p.id !== `tab-${tab}`;
  markAll();
  S.dirty.sessions = S.dirty.abnormal = S.dirty.settlements = S.dirty.stock = true;
  if (tab === 'stock') openStock();
  schedule();
}

document.addEventListener('DOMContentLoaded', () => {
  setLang(chosenLang(), false);
  for (const s of document.querySelectorAll('select.lang')) s.addEventListener('change', (e) => setLang(e.target.value, true));
  $('signin-form').addEventListener('submit', (e) => {
    e.preventDefault();
    live($('signin-error'), null);
    signIn($('key').value.trim(), $('remember').checked);
  });
  $('signout').addEventListener('click', () => signOut(''));
  $('bill-date').value = today();
  $('bill-form').addEventListener('submit', showBill);
  $('bill-download').addEventListener('click', downloadBill);
  $('service-form').addEventListener('submit', buyService);
  for (const b of document.querySelectorAll('.tab')) b.addEventListener('click', () => showTab(b.dataset.tab));
  for (const b of document.querySelectorAll('.count')) {
    b.addEventListener('click', () => { $('filter').value = b.dataset.filter; S.filter = b.dataset.filter; showTab('fleet'); });
  }
  $('search').addEventListener('input', (e) => { S.search = e.target.value.trim().toLowerCase(); S.dirty.fleet = true; schedule(); });
  $('filter').addEventListener('change', (e) => { S.filter = e.target.value; S.dirty.fleet = true; schedule(); });
  $('sort').addEventListener('change', (e) => { S.sort = e.target.value; S.dirty.fleet = true; schedule(); });
  $('fleet').addEventListener('scroll', () => renderRows(), { passive: true });
  $('d-close').addEventListener('click', () => { S.detail = null; $('detail').hidden = true; });
  $('d-config').addEventListener('submit', saveConfig);
  $('close-form').addEventListener('submit', submitClose);
  $('close-cancel').addEventListener('click', () => { $('close-form').hidden = true; });
  $('stock-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const id = $('stock-cabinet').value.trim();
    if (id) loadStock(id);
  });
  $('d-stock').addEventListener('click', () => {
    const id = S.detail;
    S.detail = null;
    $('detail').hidden = true;
    showStockOf(id);
  });
  const saved = localStorage.getItem(KEY_STORE) || sessionStorage.getItem(KEY_STORE);
  if (saved) signIn(saved, !!localStorage.getItem(KEY_STORE));
});
