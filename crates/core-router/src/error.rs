//! The one error type of this crate.

/// Everything the router can report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Two components of one side share a name.
    #[error("two components are named {0:?}")]
    DuplicateName(String),

    /// A route names no outbound component.
    #[error("{from:?} routes to {to:?}, which is not an outbound component")]
    UnknownRoute {
        /// The component whose route is wrong.
        from: String,
        /// The name it routes to.
        to: String,
    },

    /// A non-blocking component has a route, but no feedback to send along it.
    #[error("{from:?} is non-blocking, so it has no feedback to route to {to:?}")]
    RouteWithoutFeedback {
        /// The component.
        from: String,
        /// Its route.
        to: String,
    },

    /// Feedback routes form a loop.
    #[error("the feedback routes form a loop: {0}")]
    RouteLoop(String),

    /// The router is shutting down and takes no more messages.
    #[error("the router is shut down")]
    Closed,

    /// An outbound component has stopped; messages routed to it cannot be delivered.
    #[error("outbound component {0:?} has stopped")]
    ComponentGone(String),

    /// A blocking component dropped a message without answering it.
    #[error("blocking component {0:?} dropped a message without feedback")]
    NoFeedback(String),

    /// A component failed to handle a message; the reason is the component's.
    #[error("component {component:?} failed: {reason}")]
    Component {
        /// The component.
        component: String,
        /// What went wrong.
        reason: String,
    },

    /// A shutdown with a deadline did not finish in time; the components left were stopped.
    #[error("the router did not drain within {0:?}; the remaining components were stopped")]
    ShutdownTimedOut(std::time::Duration),

    /// A component's task ended with an error, or panicked.
    #[error("component {component:?} stopped: {reason}")]
    ComponentStopped {
        /// The component.
        component: String,
        /// Why.
        reason: String,
    },
}
