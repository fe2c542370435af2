// Modified for cabinet-hub (see PATCHES.md): a filter without wildcards is found by lookup
// instead of being matched against every topic, and a new topic is matched only against the
// wildcard filters. Routing was quadratic in the number of clients that each subscribe to a
// topic of their own.
use super::Ack;
use slab::Slab;
use tracing::{info, trace};

use crate::protocol::{
    has_wildcards, matches, ConnAck, ConnAckProperties, PingResp, PubAck, PubComp, PubRec, PubRel,
    Publish, PublishProperties, SubAck, UnsubAck,
};
use crate::router::{DataRequest, FilterIdx, SubscriptionMeter, Waiters};
use crate::{ConnectionId, Filter, Offset, RouterConfig, Topic};

use crate::segments::{CommitLog, Position};
use crate::Storage;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::time::Instant;

type PubWithProp = (Publish, Option<PublishProperties>);

#[derive(Clone)]
pub struct PublishData {
    pub publish: Publish,
    pub properties: Option<PublishProperties>,
    pub timestamp: Instant,
}

impl From<PubWithProp> for PublishData {
    fn from((publish, properties): PubWithProp) -> Self {
        PublishData {
            publish,
            properties,
            timestamp: Instant::now(),
        }
    }
}

// TODO: remove this from here
impl Storage for PublishData {
    // TODO: calculate size of publish properties as well!
    fn size(&self) -> usize {
        let publish = &self.publish;
        4 + publish.topic.len() + publish.payload.len()
    }
}

/// Stores 'device' data and 'actions' data in native commitlog
/// organized by subscription filter. Device data is replicated
/// while actions data is not
pub struct DataLog {
    pub config: RouterConfig,
    /// Native commitlog data organized by subscription. Contains
    /// device data and actions data logs.
    ///
    /// Device data is replicated while actions data is not.
    /// Also has waiters used to wake connections/replicator tracker
    /// which are caught up with all the data on 'Filter' and waiting
    /// for new data
    pub native: Slab<Data<PublishData>>,
    /// Map of subscription filter name to filter index
    filter_indexes: HashMap<Filter, FilterIdx>,
    /// The filters of `filter_indexes` that have wildcards, the only ones a new topic has to be
    /// matched against one by one
    wildcard_filters: Vec<(Filter, FilterIdx)>,
    retained_publishes: HashMap<Topic, PublishData>,
    /// List of filters associated with a topic
    publish_filters: HashMap<Topic, Vec<FilterIdx>>,
    /// cabinet-hub patch (PATCHES.md 11): the logs of `RouterConfig::lossless_filters`.
    lossless: Vec<FilterIdx>,
}

impl DataLog {
    pub fn new(config: RouterConfig) -> io::Result<DataLog> {
        let mut native = Slab::new();
        let mut filter_indexes = HashMap::new();
        let mut wildcard_filters = Vec::new();
        let retained_publishes = HashMap::new();
        let publish_filters = HashMap::new();
        let mut lossless = Vec::new();

        if let Some(warmup_filters) = config.initialized_filters.clone() {
            for filter in warmup_filters {
                let data = Data::new(&filter, &config);

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = native.insert(data);
                if config.lossless_filters.contains(&filter) {
                    lossless.push(idx);
                }
                if has_wildcards(&filter) {
                    wildcard_filters.push((filter.clone(), idx));
                }
                filter_indexes.insert(filter, idx);
            }
        }

        Ok(DataLog {
            config,
            native,
            publish_filters,
            filter_indexes,
            wildcard_filters,
            retained_publishes,
            lossless,
        })
    }

    /// Whether a lossless filter's log is full with a reader still in its oldest segment: the
    /// next publish appended to it would have to be held or grow it. cabinet-hub patch
    /// (PATCHES.md 11).
    #[inline]
    pub fn lossless_full(&self) -> bool {
        self.lossless.iter().any(|idx| {
            self.native
                .get(*idx)
                .is_some_and(|d| d.holds_unread_at_risk())
        })
    }

    /// Whether any filter is lossless (else no connection is ever held).
    #[inline]
    pub fn has_lossless(&self) -> bool {
        !self.lossless.is_empty()
    }

    /// Whether `id` reads a lossless filter (and so is never held: holding the reader cannot
    /// help it catch up).
    pub fn is_lossless_reader(&self, id: ConnectionId) -> bool {
        self.lossless
            .iter()
            .any(|idx| self.native.get(*idx).is_some_and(|d| d.is_reader(id)))
    }

    /// Records a reader's position in a filter's log (kept for lossless filters only).
    #[inline]
    pub fn note_read(&mut self, filter_idx: FilterIdx, id: ConnectionId, cursor: Offset) {
        if let Some(data) = self.native.get_mut(filter_idx) {
            data.note_read(id, cursor);
        }
    }

    pub fn meter(&mut self, filter: &str) -> Option<&mut SubscriptionMeter> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        Some(&mut data.meter)
    }

    pub fn waiters(&self, filter: &Filter) -> Option<&Waiters<DataRequest>> {
        self.native
            .get(*self.filter_indexes.get(filter)?)
            .map(|data| &data.waiters)
    }

    pub fn remove_waiters_for_id(
        &mut self,
        id: ConnectionId,
        filter: &Filter,
    ) -> Option<DataRequest> {
        let data = self
            .native
            .get_mut(*self.filter_indexes.get(filter)?)
            .unwrap();
        data.forget_reader(id);
        let waiters = data.waiters.get_mut();

        waiters
            .iter()
            .position(|&(conn_id, _)| conn_id == id)
            .and_then(|index| {
                waiters
                    .swap_remove_back(index)
                    .map(|(_, data_req)| data_req)
            })
    }

    // TODO: Currently returning a Option<Vec> instead of Option<&Vec> due to Rust borrow checker
    // limitation
    pub fn matches(&mut self, topic: &str) -> Option<Vec<usize>> {
        match &self.publish_filters.get(topic) {
            Some(v) => Some(v.to_vec()),
            None => {
                let v = self.match_filters(topic);

                if !v.is_empty() {
                    self.publish_filters.insert(topic.to_owned(), v.clone());
                }

                Some(v)
            }
        }
    }

    /// All filters that match `topic`: the same set as trying `matches` on every filter. A filter
    /// without wildcards matches exactly the topic spelled like it (and none that starts with
    /// '$'), so it is looked up; only the wildcard filters are tried.
    fn match_filters(&self, topic: &str) -> Vec<FilterIdx> {
        let mut v = Vec::new();
        if topic.starts_with('$') {
            return v;
        }
        if !has_wildcards(topic) {
            if let Some(idx) = self.filter_indexes.get(topic) {
                v.push(*idx);
            }
        }
        v.extend(
            self.wildcard_filters
                .iter()
                .filter(|(filter, _)| matches(topic, filter))
                .map(|(_, filter_idx)| *filter_idx),
        );
        v
    }

    pub fn next_native_offset(&mut self, filter: &str) -> (FilterIdx, Offset) {
        let publish_filters = &mut self.publish_filters;
        let filter_indexes = &mut self.filter_indexes;

        let (filter_idx, data) = match filter_indexes.get(filter) {
            Some(idx) => (*idx, self.native.get(*idx).unwrap()),
            None => {
                let data = Data::new(filter, &self.config);

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = self.native.insert(data);
                self.filter_indexes.insert(filter.to_owned(), idx);
                if self.config.lossless_filters.iter().any(|f| f == filter) {
                    self.lossless.push(idx);
                }

                // Match new filter to existing topics and add to publish_filters if it matches.
                // Without wildcards it can only match the topic spelled like it.
                if has_wildcards(filter) {
                    self.wildcard_filters.push((filter.to_owned(), idx));
                    for (topic, filters) in publish_filters.iter_mut() {
                        if matches(topic, filter) {
                            filters.push(idx);
                        }
                    }
                } else if let Some(filters) = publish_filters.get_mut(filter) {
                    filters.push(idx);
                }

                (idx, self.native.get(idx).unwrap())
            }
        };

        (filter_idx, data.log.next_offset())
    }

    pub fn native_readv(
        &self,
        filter_idx: FilterIdx,
        offset: Offset,
        len: u64,
    ) -> io::Result<(Position, Vec<(PubWithProp, Offset)>)> {
        // unwrap to get index of `self.native` is fine here, because when a new subscribe packet
        // arrives in `Router::handle_device_payload`, it first calls the function
        // `next_native_offset` which creates a new commitlog if one doesn't exist. So any new
        // reads will definitely happen on a valid filter.
        let data = self.native.get(filter_idx).unwrap();
        let mut o = Vec::new();
        // TODO: `readv` is infallible but its current return type does not
        // reflect that. Consequently, this method is also infallible.
        // Encoding this information is important so that calling function
        // has more information on how this method behaves.
        let next = data.log.readv(offset, len, &mut o)?;

        let now = Instant::now();
        o.retain_mut(|(pubdata, _)| {
            // Keep data if no properties exists, which implies no message expiry!
            let Some(properties) = pubdata.properties.as_mut() else {
                return true;
            };

            // Keep data if there is no message_expiry_interval
            let Some(message_expiry_interval) = properties.message_expiry_interval.as_mut() else {
                return true;
            };

            let time_spent = (now - pubdata.timestamp).as_secs() as u32;

            let is_valid = time_spent < *message_expiry_interval;

            // ignore expired messages
            if is_valid {
                // set message_expiry_interval to (original value - time spent waiting in server)
                // ref: https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html#_Toc3901112
                *message_expiry_interval -= time_spent;
            }

            is_valid
        });

        // no need to include timestamp when returning
        let o = o
            .into_iter()
            .map(|(pubdata, offset)| ((pubdata.publish, pubdata.properties), offset))
            .collect();

        Ok((next, o))
    }

    pub fn shadow(&mut self, filter: &str) -> Option<PubWithProp> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        data.log.last().map(|p| (p.publish, p.properties))
    }

    /// This method is called when the subscriber has caught up with the commit log. In which case,
    /// instead of actively checking for commits in each `Router::run_inner` iteration, we instead
    /// wait and only try reading again when new messages have been added to the commit log. This
    /// methods converts a `DataRequest` (which actively reads the commit log in `Router::consume`)
    /// to a `Waiter` (which only reads when notified).
    pub fn park(&mut self, id: ConnectionId, request: DataRequest) {
        // calling unwrap on index here is fine, because only place this function is called is in
        // `Router::consume` method, when the status after reading from commit log of the same
        // filter as `request` is "done", that is, the subscriber has caught up. In other words,
        // there has been atleast 1 call to `native_readv` for the same filter, which means if
        // `native_readv` hasn't paniced, so this won't panic either.
        let data = self.native.get_mut(request.filter_idx).unwrap();
        data.waiters.register(id, request);
    }

    /// Empties the filter's log when every one of its `readers` is parked at its end, i.e. has
    /// read everything in it. cabinet-hub patch (PATCHES.md).
    pub fn discard_if_all_read(&mut self, filter_idx: FilterIdx, readers: usize) {
        let Some(data) = self.native.get_mut(filter_idx) else {
            return;
        };
        if readers > 0 && data.waiters.waiters().len() == readers {
            data.log.discard_all();
        }
    }

    /// Cleanup a connection from all the waiters
    pub fn clean(&mut self, id: ConnectionId) -> Vec<DataRequest> {
        let mut inflight = Vec::new();
        for (_, data) in self.native.iter_mut() {
            inflight.append(&mut data.waiters.remove(id));
            data.forget_reader(id);
        }

        inflight
    }

    pub fn insert_to_retained_publishes(
        &mut self,
        publish: Publish,
        publish_properties: Option<PublishProperties>,
        topic: Topic,
    ) {
        let pub_with_props = (publish, publish_properties);
        self.retained_publishes.insert(topic, pub_with_props.into());
    }

    pub fn remove_from_retained_publishes(&mut self, topic: Topic) {
        self.retained_publishes.remove(&topic);
    }

    pub fn read_retained_messages(&mut self, filter: &str) -> Vec<PubWithProp> {
        trace!(info = "reading retain msg", filter = &filter);
        let now = Instant::now();

        // discard expired retained messages
        self.retained_publishes.retain(|_, pubdata| {
            // Keep data if no properties exists, which implies no message expiry!
            let Some(properties) = pubdata.properties.as_mut() else {
                return true;
            };

            // Keep data if there is no message_expiry_interval
            let Some(message_expiry_interval) = properties.message_expiry_interval.as_mut() else {
                return true;
            };

            let time_spent = (now - pubdata.timestamp).as_secs() as u32;

            let is_valid = time_spent < *message_expiry_interval;

            // ignore expired messages
            if is_valid {
                // set message_expiry_interval to (original value - time spent waiting in server)
                // ref: https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html#_Toc3901112
                *message_expiry_interval -= time_spent;
            }

            is_valid
        });

        // no need to include timestamp when returning
        self.retained_publishes
            .iter()
            .filter(|(topic, _)| matches(topic, filter))
            .map(|(_, p)| (p.publish.clone(), p.properties.clone()))
            .collect()
    }
}

pub struct Data<T> {
    filter: Filter,
    pub log: CommitLog<T>,
    pub waiters: Waiters<DataRequest>,
    meter: SubscriptionMeter,
    /// cabinet-hub patch (PATCHES.md 11): a filter of `RouterConfig::lossless_filters`.
    lossless: bool,
    /// cabinet-hub patch (PATCHES.md 11): where each reader of a lossless filter is, as of its
    /// last read (tracked for lossless filters only).
    readers: Vec<(ConnectionId, Offset)>,
}

impl<T> Data<T>
where
    T: Storage + Clone,
{
    pub fn new(filter: &str, router_config: &RouterConfig) -> Data<T> {
        let mut max_segment_size = router_config.max_segment_size;
        let mut max_mem_segments = router_config.max_segment_count;

        // Override segment config for selected filter
        if let Some(config) = &router_config.custom_segment {
            for (f, segment_config) in config {
                if matches(filter, f) {
                    info!("Overriding segment config for filter: {}", filter);
                    max_segment_size = segment_config.max_segment_size;
                    max_mem_segments = segment_config.max_segment_count;
                }
            }
        }

        // max_segment_size: usize, max_mem_segments: usize
        let log = CommitLog::new(max_segment_size, max_mem_segments).unwrap();

        // cabinet-hub patch (PATCHES.md): empty until a reader parks (room for 10 before).
        let waiters = Waiters::with_capacity(0);
        let metrics = SubscriptionMeter::default();
        let lossless = router_config.lossless_filters.iter().any(|f| f == filter);
        Data {
            filter: filter.to_owned(),
            log,
            waiters,
            meter: metrics,
            lossless,
            readers: Vec::new(),
        }
    }

    /// Whether the next append would evict what a reader has not read yet: the log is full
    /// and a reader is still in its oldest segment. Only lossless filters track their readers.
    /// cabinet-hub patch (PATCHES.md 11).
    pub fn holds_unread_at_risk(&self) -> bool {
        self.lossless && self.log.full() && self.readers.iter().any(|(_, c)| c.0 <= self.log.head())
    }

    /// Records where a reader of a lossless filter is. cabinet-hub patch (PATCHES.md 11).
    pub fn note_read(&mut self, id: ConnectionId, cursor: Offset) {
        if !self.lossless {
            return;
        }
        match self.readers.iter_mut().find(|(r, _)| *r == id) {
            Some((_, c)) => *c = cursor,
            None => self.readers.push((id, cursor)),
        }
    }

    /// Whether `id` reads this (lossless) filter.
    pub fn is_reader(&self, id: ConnectionId) -> bool {
        self.readers.iter().any(|(r, _)| *r == id)
    }

    /// Forgets a reader that unsubscribed or went away.
    pub fn forget_reader(&mut self, id: ConnectionId) {
        self.readers.retain(|(r, _)| *r != id);
    }

    /// Writes to all the filters that are mapped to this publish topic
    /// and wakes up consumers that are matching this topic (if they exist)
    pub fn append(
        &mut self,
        item: T,
        notifications: &mut VecDeque<(ConnectionId, DataRequest)>,
    ) -> (Offset, &Filter) {
        let size = item.size();
        // cabinet-hub patch (PATCHES.md 11): a lossless log keeps what its readers have not
        // read. The router holds network publishers before this happens; what still arrives
        // (the readers' own publishes) grows the log past its cap rather than be lost.
        let offset = if self.holds_unread_at_risk() {
            self.log.append_keeping(item)
        } else {
            self.log.append(item)
        };
        if let Some(mut parked) = self.waiters.take() {
            notifications.append(&mut parked);
        }

        self.meter.count += 1;
        self.meter.total_size += size;

        (offset, &self.filter)
    }
}

/// Acks log for a subscription
#[derive(Debug)]
pub struct AckLog {
    // Committed acks per connection. First pkid, last pkid, data
    committed: VecDeque<Ack>,
    // Recorded qos 2 publishes
    recorded: VecDeque<(Publish, Option<PublishProperties>)>,
}

impl AckLog {
    /// New log
    pub fn new() -> AckLog {
        AckLog {
            // cabinet-hub patch (PATCHES.md): grow with use instead of ~45 KB per connection.
            committed: VecDeque::new(),
            recorded: VecDeque::new(),
        }
    }

    pub fn connack(&mut self, id: ConnectionId, ack: ConnAck, props: Option<ConnAckProperties>) {
        let ack = Ack::ConnAck(id, ack, props);
        self.committed.push_back(ack);
    }

    pub fn suback(&mut self, ack: SubAck) {
        let ack = Ack::SubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn puback(&mut self, ack: PubAck) {
        let ack = Ack::PubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn pubrec(&mut self, publish: Publish, props: Option<PublishProperties>, ack: PubRec) {
        let ack = Ack::PubRec(ack);
        self.recorded.push_back((publish, props));
        self.committed.push_back(ack);
    }

    pub fn pubrel(&mut self, ack: PubRel) {
        let ack = Ack::PubRel(ack);
        self.committed.push_back(ack);
    }

    pub fn pubcomp(&mut self, ack: PubComp) -> Option<(Publish, Option<PublishProperties>)> {
        let ack = Ack::PubComp(ack);
        self.committed.push_back(ack);
        self.recorded.pop_front()
    }

    pub fn pingresp(&mut self, ack: PingResp) {
        let ack = Ack::PingResp(ack);
        self.committed.push_back(ack);
    }

    pub fn unsuback(&mut self, ack: UnsubAck) {
        let ack = Ack::UnsubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn readv(&mut self) -> &mut VecDeque<Ack> {
        &mut self.committed
    }
}

#[cfg(test)]
mod test {
    use super::DataLog;
    use crate::router::shared_subs::Strategy;
    use crate::RouterConfig;

    // cabinet-hub patch (PATCHES.md)
    #[test]
    fn a_log_is_emptied_only_once_every_reader_has_read_it() {
        use crate::protocol::Publish;
        use crate::router::DataRequest;
        use std::collections::VecDeque;

        let mut data = DataLog::new(test_config(&[])).unwrap();
        let (idx, start) = data.next_native_offset("cmd/1");
        let publish = Publish::new(b"cmd/1".to_vec(), vec![7u8; 100], false);
        for _ in 0..3 {
            data.native
                .get_mut(idx)
                .unwrap()
                .append((publish.clone(), None).into(), &mut VecDeque::new());
        }
        let request = |cursor| DataRequest {
            filter: "cmd/1".to_owned(),
            filter_idx: idx,
            qos: 1,
            cursor,
            read_count: 0,
            max_count: 100,
            forward_retained: false,
            group: None,
        };
        let end = data.native.get(idx).unwrap().log.next_offset();
        let unread = |data: &DataLog| data.native_readv(idx, start, 10).unwrap().1.len();

        // Two readers, one parked at the end: the other has not read it all yet.
        data.park(1, request(end));
        data.discard_if_all_read(idx, 2);
        assert_eq!(unread(&data), 3, "kept for the reader still reading");

        // Both parked: nothing in the log will be read again.
        data.park(2, request(end));
        data.discard_if_all_read(idx, 2);
        assert_eq!(unread(&data), 0, "emptied once everyone read it");
        // The offsets go on, so the parked cursor still reads what comes next, and only that.
        data.native
            .get_mut(idx)
            .unwrap()
            .append((publish, None).into(), &mut VecDeque::new());
        let (_, next) = data.native_readv(idx, end, 10).unwrap();
        assert_eq!(next.len(), 1);
    }

    #[test]
    fn publish_filters_updating_correctly_on_new_topic_subscription() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
            discard_consumed: false,
            tenant_policy: None,
            lossless_filters: Vec::new(),
            flow_meter: None,
        };
        let mut data = DataLog::new(config).unwrap();
        data.next_native_offset("topic/a");
        data.matches("topic/a");

        data.next_native_offset("topic/+");

        assert_eq!(data.publish_filters.get("topic/a").unwrap().len(), 2);
    }

    #[test]
    fn publish_filters_updating_correctly_on_new_publish() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
            discard_consumed: false,
            tenant_policy: None,
            lossless_filters: Vec::new(),
            flow_meter: None,
        };
        let mut data = DataLog::new(config).unwrap();
        data.next_native_offset("+/+");

        data.matches("topic/a");

        assert_eq!(data.publish_filters.get("topic/a").unwrap().len(), 1);
    }

    fn test_config(initialized_filters: &[&str]) -> RouterConfig {
        RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: Some(initialized_filters.iter().map(|f| f.to_string()).collect()),
            shared_subscriptions_strategy: Strategy::RoundRobin,
            discard_consumed: false,
            tenant_policy: None,
            lossless_filters: Vec::new(),
            flow_meter: None,
        }
    }

    fn brute_force(data: &DataLog, topic: &str) -> Vec<usize> {
        let mut v: Vec<usize> = data
            .filter_indexes
            .iter()
            .filter(|(filter, _)| crate::protocol::matches(topic, filter))
            .map(|(_, idx)| *idx)
            .collect();
        v.sort_unstable();
        v
    }

    // cabinet-hub patch: the indexed match finds the same filters as matching every filter,
    // whichever comes first, the filter or the topic.
    #[test]
    fn indexed_matching_agrees_with_matching_every_filter() {
        let filters = [
            "#", "+", "a", "a/b", "a/+", "a/#", "+/b", "+/+/c", "a/b/c", "$SYS/x", "$SYS/#", "/a",
            "/+", "a/", "a/+/", "x/y/z", "init/a",
        ];
        let topics = [
            "a", "a/b", "a/b/c", "a/c", "b/b", "$SYS/x", "$SYS/y", "/a", "a/", "x/y/z", "x/y",
            "init/a", "init/b", "", "q/b/c",
        ];
        // With "#" there from the start, every topic is remembered with its filters before the
        // other filters arrive, and each new filter has to be added to the topics it matches.
        for (init, topics_first) in [
            (&["init/+", "init/a"][..], false),
            (&["init/+", "init/a"][..], true),
            (&["#"][..], true),
        ] {
            let mut data = DataLog::new(test_config(init)).unwrap();
            if topics_first {
                for topic in topics {
                    data.matches(topic);
                }
            }
            for filter in filters {
                data.next_native_offset(filter);
            }
            for topic in topics {
                let mut got = data.matches(topic).unwrap();
                got.sort_unstable();
                assert_eq!(got, brute_force(&data, topic), "topic {topic:?}");
            }
        }
    }

    #[test]
    fn concrete_filter_matches_only_its_own_topic() {
        let mut data = DataLog::new(test_config(&[])).unwrap();
        let (cmd, _) = data.next_native_offset("t/1/cmd");
        let (all, _) = data.next_native_offset("#");
        let mut got = data.matches("t/1/cmd").unwrap();
        got.sort_unstable();
        let mut want = vec![cmd, all];
        want.sort_unstable();
        assert_eq!(got, want);
        assert_eq!(data.matches("t/2/cmd").unwrap(), vec![all]);
        assert!(data.matches("$t/1/cmd").unwrap().is_empty());
    }

    //     #[test]
    //     fn appends_are_written_to_correct_commitlog() {
    //         pretty_env_logger::init();
    //         let config = RouterConfig {
    //             instant_ack: true,
    //             max_segment_size: 1024,
    //             max_connections: 10,
    //             max_mem_segments: 10,
    //             max_disk_segments: 0,
    //             max_read_len: 1024,
    //             log_dir: None,
    //             dynamic_log: true,
    //         };

    //         let mut data = DataLog::new(config).unwrap();
    //         data.next_native_offset("/devices/2321/actions");
    //         for i in 0..2 {
    //             let publish = Publish::new("/devices/2321/events/imu/jsonarray", QoS::AtLeastOnce, vec![1, 2, 3]);
    //             let v = data.native_append(publish);
    //             dbg!(v);
    //         }

    //         for i in 0..2 {
    //             let publish = Publish::new("/devices/2321/actions", QoS::AtLeastOnce, vec![1, 2, 3]);
    //             let v = data.native_append(publish);
    //             dbg!(v);
    //         }
    //     }
}
