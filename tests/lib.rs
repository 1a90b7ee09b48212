//! Shared helpers for the real-service integration tests live in `refetch-testkit`.
