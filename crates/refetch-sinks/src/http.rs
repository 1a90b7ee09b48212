//! HTTP sink (being written).
use crate::config::HttpConfig;
use crate::factory::SinkBuildError;
/// HTTP sink (being written).
#[derive(Debug)]
pub struct HttpSink;
impl HttpSink {
    /// Not yet available.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(_cfg: &HttpConfig) -> Result<std::sync::Arc<dyn refetch::Sink>, SinkBuildError> {
        Err(SinkBuildError::FeatureDisabled("http"))
    }
}
