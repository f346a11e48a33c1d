//! The one error type of this crate.

/// Everything the gateway can report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The HTTP listener could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The address.
        address: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// A part (the worker pool) could not start.
    #[error(transparent)]
    Components(#[from] rylm_components::Error),

    /// The router refused the table or a component failed.
    #[error(transparent)]
    Router(#[from] rylm_core_router::Error),
}
