//! SQLite sink (being written).
use crate::config::SqliteConfig;
use crate::factory::SinkBuildError;
/// SQLite sink (being written).
#[derive(Debug)]
pub struct SqliteSink;
impl SqliteSink {
    /// Not yet available.
    pub async fn open(
        _cfg: &SqliteConfig,
    ) -> Result<std::sync::Arc<dyn refetch::Sink>, SinkBuildError> {
        Err(SinkBuildError::FeatureDisabled("sqlite"))
    }
}
