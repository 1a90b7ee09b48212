//! Test support shared by every refetch test tier.
//!
//! | module | what it holds |
//! |---|---|
//! | [`names`] | random topic, group and schema names, one per test |
//! | [`kafka`] | the broker a test talks to (from `REFETCH_TEST_KAFKA`), admin helpers, produce/read-back |
//! | [`postgres`] | the PostgreSQL a test talks to (from `REFETCH_TEST_PG`), a fresh schema per test |
//! | [`process`] | spawning and killing pipeline processes for crash tests |
//! | [`http_source`] | a local HTTP source on 127.0.0.1 whose entities change, with fault injection |
//! | [`mock`] | librdkafka's mock cluster with no initial rebalance delay |
//! | [`raw_http`] | a hostile HTTP server writing raw bytes (broken chunking, slowloris, wrong content types) |
//! | [`memory`] | an in-memory versioned source (a `Fetcher`) and a recording sink with failure injection |
//! | [`txn_sink`] | an in-memory transactional sink (exactly-once) that loses transactions the way a database does |

pub mod http_source;
pub mod kafka;
pub mod memory;
pub mod mock;
pub mod names;
pub mod postgres;
pub mod process;
pub mod raw_http;
pub mod txn_sink;
