//! Which connections of one agent id are live: the lanes of one agent instance, side by
//! side, and nothing of an older instance (docs/protocol.md §2, "Lanes").
//!
//! An agent that stripes its files over N connections says in each `Hello` which
//! instance (a random number drawn at its start) and which lane (`0..N`) the connection
//! is. The receiver keeps every lane of the newest instance and supersedes:
//! - all connections of any other instance (a restarted agent whose old connections have
//!   not timed out yet, or two agents running with one id: these keep superseding each
//!   other, which the metric shows), and
//! - an older connection of the same lane of the same instance (that lane's path died and
//!   the agent dialled it again before the receiver noticed).
//!
//! A hello without a lane is an instance of its own, so such an agent keeps exactly one
//! live connection, as before lanes existed. Pure bookkeeping, generic over the
//! connection handle so that the rules are unit-tested without sockets.

/// Who a connection belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Instance {
    /// The instance number from the hello's lane.
    Laned(u64),
    /// A hello without a lane: its own instance, named by the connection's generation.
    Single(u64),
}

/// What admitting a connection displaced.
#[derive(Debug, PartialEq, Eq)]
pub enum Displaced<C> {
    Nothing,
    /// The same lane of the same instance, dialled again.
    SameLane(C),
    /// Every live connection of an older instance.
    OtherInstance(Vec<C>),
}

impl<C> Displaced<C> {
    pub fn into_vec(self) -> Vec<C> {
        match self {
            Displaced::Nothing => Vec::new(),
            Displaced::SameLane(c) => vec![c],
            Displaced::OtherInstance(v) => v,
        }
    }
}

struct Entry<C> {
    lane: u16,
    generation: u64,
    conn: C,
}

/// The live connections of one agent id.
pub struct LiveLanes<C> {
    instance: Option<Instance>,
    entries: Vec<Entry<C>>,
}

impl<C> Default for LiveLanes<C> {
    fn default() -> Self {
        LiveLanes {
            instance: None,
            entries: Vec::new(),
        }
    }
}

impl<C> LiveLanes<C> {
    /// Makes `conn` (lane `lane` of `instance`, numbered `generation`) live and returns
    /// what it displaces, for the caller to close.
    pub fn admit(
        &mut self,
        instance: Instance,
        lane: u16,
        generation: u64,
        conn: C,
    ) -> Displaced<C> {
        let displaced = if self.instance == Some(instance) {
            match self.entries.iter().position(|e| e.lane == lane) {
                Some(i) => Displaced::SameLane(self.entries.swap_remove(i).conn),
                None => Displaced::Nothing,
            }
        } else {
            self.instance = Some(instance);
            let older: Vec<C> = self.entries.drain(..).map(|e| e.conn).collect();
            if older.is_empty() {
                Displaced::Nothing
            } else {
                Displaced::OtherInstance(older)
            }
        };
        self.entries.push(Entry {
            lane,
            generation,
            conn,
        });
        displaced
    }

    /// Forgets the connection numbered `generation`, if it is still live.
    pub fn remove(&mut self, generation: u64) {
        self.entries.retain(|e| e.generation != generation);
    }

    /// How many connections are live.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_of_one_instance_live_side_by_side() {
        let mut live = LiveLanes::default();
        let a = Instance::Laned(7);
        for lane in 0..4u16 {
            assert_eq!(
                live.admit(a, lane, u64::from(lane), lane),
                Displaced::Nothing
            );
        }
        assert_eq!(live.len(), 4);
    }

    #[test]
    fn a_lane_dialled_again_displaces_only_its_older_self() {
        let mut live = LiveLanes::default();
        let a = Instance::Laned(7);
        live.admit(a, 0, 1, "a0");
        live.admit(a, 1, 2, "a1");
        assert_eq!(live.admit(a, 1, 3, "a1 again"), Displaced::SameLane("a1"));
        assert_eq!(live.len(), 2);
    }

    #[test]
    fn a_new_instance_displaces_every_lane_of_the_older() {
        let mut live = LiveLanes::default();
        let (a, b) = (Instance::Laned(7), Instance::Laned(8));
        live.admit(a, 0, 1, "a0");
        live.admit(a, 1, 2, "a1");
        live.admit(a, 2, 3, "a2");
        let mut older = live.admit(b, 0, 4, "b0").into_vec();
        older.sort_unstable();
        assert_eq!(older, ["a0", "a1", "a2"]);
        assert_eq!(live.admit(b, 1, 5, "b1"), Displaced::Nothing);
        // Two agents with one id: the other one's next lane displaces this one again.
        assert_eq!(
            live.admit(a, 3, 6, "a3").into_vec().len(),
            2,
            "they keep superseding each other"
        );
    }

    #[test]
    fn connections_without_lanes_keep_one_live_connection_as_before() {
        let mut live = LiveLanes::default();
        live.admit(Instance::Single(1), 0, 1, "first");
        assert_eq!(
            live.admit(Instance::Single(2), 0, 2, "second"),
            Displaced::OtherInstance(vec!["first"])
        );
        assert_eq!(live.len(), 1);
    }

    #[test]
    fn an_ended_connection_is_forgotten_and_a_stale_end_changes_nothing() {
        let mut live = LiveLanes::default();
        let a = Instance::Laned(7);
        live.admit(a, 0, 1, "a0");
        live.admit(a, 0, 2, "a0 again");
        live.remove(1); // the displaced one ends later: the live lane stays
        assert_eq!(live.len(), 1);
        live.remove(2);
        assert_eq!(live.len(), 0);
    }
}
