//! The routing table as plain data: which outbound component each message goes to next, checked
//! for unknown names, duplicates and loops when it is built. No tasks, no channels.

use std::collections::HashMap;

use crate::Error;

/// Whether a component waits for the answer to each message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The component answers each message with feedback, which the router routes on (or hands
    /// back to the inbound component that sent the message).
    Blocking,
    /// The component takes the message and nothing comes back.
    NonBlocking,
}

/// One inbound component's entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundEntry {
    /// The component's name.
    pub name: String,
    /// The outbound component its messages go to.
    pub route: String,
    /// Whether it waits for the feedback of its messages.
    pub mode: Mode,
}

/// One outbound component's entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboundEntry {
    /// The component's name.
    pub name: String,
    /// Where its feedback goes next; `None` hands it back to the inbound component.
    pub route: Option<String>,
    /// Whether it gives feedback.
    pub mode: Mode,
}

/// A checked routing table, with names resolved to indices.
#[derive(Clone, Debug)]
pub struct Table {
    /// Inbound components, in registration order.
    pub inbound: Vec<InboundEntry>,
    /// Outbound components, in registration order.
    pub outbound: Vec<OutboundEntry>,
    /// For each inbound component, the index of its first outbound component.
    pub inbound_route: Vec<usize>,
    /// For each outbound component, the index its feedback goes to next, if any.
    pub outbound_route: Vec<Option<usize>>,
}

impl Table {
    /// Checks the entries and resolves their routes.
    ///
    /// Refused: two components of one side with the same name, a route to a name that is not an
    /// outbound component, a non-blocking component with a route (it has no feedback to route),
    /// and a loop of feedback routes (a message would go round for ever).
    pub fn build(inbound: Vec<InboundEntry>, outbound: Vec<OutboundEntry>) -> Result<Table, Error> {
        let mut index = HashMap::new();
        for (i, entry) in outbound.iter().enumerate() {
            if index.insert(entry.name.clone(), i).is_some() {
                return Err(Error::DuplicateName(entry.name.clone()));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for entry in &inbound {
            if !seen.insert(entry.name.clone()) {
                return Err(Error::DuplicateName(entry.name.clone()));
            }
        }
        let resolve = |from: &str, to: &str| {
            index.get(to).copied().ok_or_else(|| Error::UnknownRoute {
                from: from.to_owned(),
                to: to.to_owned(),
            })
        };
        let inbound_route = inbound
            .iter()
            .map(|entry| resolve(&entry.name, &entry.route))
            .collect::<Result<Vec<_>, _>>()?;
        let mut outbound_route = Vec::with_capacity(outbound.len());
        for entry in &outbound {
            match (&entry.route, entry.mode) {
                (Some(route), Mode::NonBlocking) => {
                    return Err(Error::RouteWithoutFeedback {
                        from: entry.name.clone(),
                        to: route.clone(),
                    });
                }
                (Some(route), Mode::Blocking) => {
                    outbound_route.push(Some(resolve(&entry.name, route)?))
                }
                (None, _) => outbound_route.push(None),
            }
        }
        // Each outbound component has at most one next hop, so following the chain from every
        // component finds any loop within `outbound.len()` steps.
        for start in 0..outbound.len() {
            let mut path = vec![start];
            let mut at = start;
            while let Some(next) = outbound_route[at] {
                if path.contains(&next) {
                    let names: Vec<String> = path
                        .iter()
                        .chain(std::iter::once(&next))
                        .map(|i| outbound[*i].name.clone())
                        .collect();
                    return Err(Error::RouteLoop(names.join(" -> ")));
                }
                path.push(next);
                at = next;
            }
        }
        Ok(Table {
            inbound,
            outbound,
            inbound_route,
            outbound_route,
        })
    }

    /// The outbound components a message from inbound component `inbound` visits, in order.
    pub fn path_of(&self, inbound: usize) -> Vec<usize> {
        let mut path = Vec::new();
        let mut at = self.inbound_route.get(inbound).copied();
        while let Some(i) = at {
            path.push(i);
            at = match self.outbound[i].mode {
                Mode::Blocking => self.outbound_route[i],
                Mode::NonBlocking => None,
            };
        }
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbound(name: &str, route: &str) -> InboundEntry {
        InboundEntry {
            name: name.into(),
            route: route.into(),
            mode: Mode::NonBlocking,
        }
    }

    fn outbound(name: &str, route: Option<&str>, mode: Mode) -> OutboundEntry {
        OutboundEntry {
            name: name.into(),
            route: route.map(Into::into),
            mode,
        }
    }

    #[test]
    fn resolves_chains_to_any_depth() {
        let table = Table::build(
            vec![inbound("pull", "a")],
            vec![
                outbound("a", Some("b"), Mode::Blocking),
                outbound("b", Some("c"), Mode::Blocking),
                outbound("c", Some("d"), Mode::Blocking),
                outbound("d", None, Mode::NonBlocking),
            ],
        )
        .expect("a valid table");
        assert_eq!(table.path_of(0), vec![0, 1, 2, 3]);
    }

    #[test]
    fn refuses_loops_unknown_routes_duplicates_and_routes_without_feedback() {
        let looped = Table::build(
            vec![inbound("pull", "a")],
            vec![
                outbound("a", Some("b"), Mode::Blocking),
                outbound("b", Some("c"), Mode::Blocking),
                outbound("c", Some("a"), Mode::Blocking),
            ],
        );
        match looped {
            Err(Error::RouteLoop(path)) => assert_eq!(path, "a -> b -> c -> a"),
            other => panic!("{other:?}"),
        }
        let itself = Table::build(vec![], vec![outbound("a", Some("a"), Mode::Blocking)]);
        assert!(matches!(itself, Err(Error::RouteLoop(_))));
        let unknown = Table::build(vec![inbound("pull", "nowhere")], vec![]);
        assert!(matches!(unknown, Err(Error::UnknownRoute { .. })));
        let dup = Table::build(
            vec![],
            vec![
                outbound("a", None, Mode::Blocking),
                outbound("a", None, Mode::Blocking),
            ],
        );
        assert!(matches!(dup, Err(Error::DuplicateName(_))));
        let no_feedback = Table::build(
            vec![],
            vec![
                outbound("a", Some("b"), Mode::NonBlocking),
                outbound("b", None, Mode::Blocking),
            ],
        );
        assert!(matches!(
            no_feedback,
            Err(Error::RouteWithoutFeedback { .. })
        ));
    }
}
