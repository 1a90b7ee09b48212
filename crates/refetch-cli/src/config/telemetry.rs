//! `[traces]`: OpenTelemetry trace export over OTLP/HTTP (off unless an endpoint is set).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// `[traces]`: export the spans of flights, fetches and sink batches to an OpenTelemetry
/// collector (OTLP over HTTP, protobuf), and send a W3C `traceparent` header on source requests.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracesSection {
    /// The collector's OTLP/HTTP traces URL, for example `"http://127.0.0.1:4318/v1/traces"`.
    /// Unset (the default): no spans leave the process and requests carry no `traceparent`.
    #[serde(
        default,
        deserialize_with = "endpoint",
        skip_serializing_if = "Option::is_none"
    )]
    pub endpoint: Option<String>,
    /// The `service.name` resource attribute of every span.
    pub service_name: String,
    /// The share of flights traced, from 0 to 1 (requests whose caller sent a sampled trace
    /// context follow that decision).
    #[serde(deserialize_with = "ratio")]
    pub sample_ratio: f64,
    /// Extra HTTP headers on export requests (for example a collector's API key; values may
    /// use `${VAR}` and are never logged).
    pub headers: BTreeMap<String, String>,
    /// How long one export request may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for TracesSection {
    fn default() -> Self {
        TracesSection {
            endpoint: None,
            service_name: "refetch".to_owned(),
            sample_ratio: 1.0,
            headers: BTreeMap::new(),
            timeout: Duration::from_secs(10),
        }
    }
}

impl std::fmt::Debug for TracesSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TracesSection")
            .field("endpoint", &self.endpoint)
            .field("service_name", &self.service_name)
            .field("sample_ratio", &self.sample_ratio)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn endpoint<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    match url::Url::parse(&s) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(Some(s)),
        Ok(u) => Err(serde::de::Error::custom(format!(
            "expected an http:// or https:// URL of an OTLP/HTTP collector, found scheme `{}`",
            u.scheme()
        ))),
        Err(e) => Err(serde::de::Error::custom(format!(
            "expected the collector's URL, for example \"http://127.0.0.1:4318/v1/traces\": {e}"
        ))),
    }
}

fn ratio<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = f64::deserialize(d)?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(serde::de::Error::custom(format!(
            "expected a share from 0 to 1 (for example 0.1 for one flight in ten), found {v}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_off_and_bad_values_are_refused() {
        let t: TracesSection = toml::from_str("").unwrap();
        assert_eq!(t, TracesSection::default());
        assert!(t.endpoint.is_none());
        let t: TracesSection = toml::from_str(
            "endpoint = \"http://127.0.0.1:4318/v1/traces\"\nsample_ratio = 0.25\nheaders = { x-api-key = \"s3cret\" }",
        )
        .unwrap();
        assert_eq!(t.sample_ratio, 0.25);
        assert!(
            !format!("{t:?}").contains("s3cret"),
            "header values are never printed"
        );
        let e = toml::from_str::<TracesSection>("sample_ratio = 1.5").unwrap_err();
        assert!(e.to_string().contains("from 0 to 1"), "{e}");
        let e = toml::from_str::<TracesSection>("endpoint = \"ftp://x/\"").unwrap_err();
        assert!(e.to_string().contains("http://"), "{e}");
        let e = toml::from_str::<TracesSection>("endpoint = \"127.0.0.1:4318\"").unwrap_err();
        assert!(e.to_string().contains("collector"), "{e}");
    }
}
