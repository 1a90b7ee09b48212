//! librdkafka's built-in mock cluster, set up for fast tests.
//!
//! The mock cluster delays the first rebalance of every group by 3 s by default (like a broker's
//! `group.initial.rebalance.delay.ms`). rdkafka's safe `MockCluster` wrapper does not expose that
//! setting, so this module reaches the mock through librdkafka's C API: a producer created with
//! `test.mock.num.brokers` owns the cluster, and the cluster handle is taken from it.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};

use anyhow::{Context, bail};
use rdkafka::ClientConfig;
use rdkafka::bindings as rd;
use rdkafka::producer::{BaseProducer, Producer};

/// A mock Kafka cluster living in this process.
pub struct MockKafka {
    owner: BaseProducer,
    bootstrap: String,
}

impl std::fmt::Debug for MockKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockKafka")
            .field("bootstrap", &self.bootstrap)
            .finish()
    }
}

impl MockKafka {
    /// Start a mock cluster of `brokers` brokers with no initial rebalance delay.
    pub fn start(brokers: i32) -> anyhow::Result<Self> {
        let owner: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", brokers.to_string())
            .create()
            .context("creating the mock cluster")?;
        let mc = Self::handle(&owner)?;
        // SAFETY: `mc` is the non-null mock cluster owned by `owner`, which outlives this call.
        let bootstrap = unsafe {
            rd::rd_kafka_mock_group_initial_rebalance_delay_ms(mc, 0);
            CStr::from_ptr(rd::rd_kafka_mock_cluster_bootstraps(mc))
                .to_string_lossy()
                .into_owned()
        };
        Ok(MockKafka { owner, bootstrap })
    }

    fn handle(owner: &BaseProducer) -> anyhow::Result<*mut rd::rd_kafka_mock_cluster_t> {
        // SAFETY: the native handle is valid while `owner` lives.
        let mc = unsafe { rd::rd_kafka_handle_mock_cluster(owner.client().native_ptr()) };
        if mc.is_null() {
            bail!("the client has no mock cluster");
        }
        Ok(mc)
    }

    /// The cluster's `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Create a topic.
    pub fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        let mc = Self::handle(&self.owner)?;
        let topic = CString::new(name).context("topic name has a NUL byte")?;
        // SAFETY: valid cluster handle and a NUL-terminated topic name that outlives the call.
        let err = unsafe { rd::rd_kafka_mock_topic_create(mc, topic.as_ptr(), partitions, 1) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            bail!("mock topic {name} not created: {err:?}");
        }
        Ok(())
    }
}
