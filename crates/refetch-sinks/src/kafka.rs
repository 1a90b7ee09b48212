//! Kafka topic sink (being written).
use crate::config::KafkaConfig;
use crate::factory::SinkBuildError;
/// Kafka topic sink (being written).
#[derive(Debug)]
pub struct KafkaSink;
impl KafkaSink {
    /// Not yet available.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(_cfg: &KafkaConfig) -> Result<std::sync::Arc<dyn refetch::Sink>, SinkBuildError> {
        Err(SinkBuildError::FeatureDisabled("kafka"))
    }
}
