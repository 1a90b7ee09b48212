//! Tests of the operations endpoint.
