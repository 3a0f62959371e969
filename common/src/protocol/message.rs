//! The messages of the skyferry protocol, as plain data.
//!
//! Nothing here knows about bytes on the wire: [`super::codec`] maps these
//! types to frames. Field meanings are documented here; encodings there.

use std::fmt;

use bytes::Bytes;

/// A BLAKE3 digest (of a whole file or of one raw chunk).
pub type Hash = [u8; 32];

/// Lowercase hex of a hash, all 64 characters.
pub fn hex(h: &Hash) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(h.len() * 2);
    for b in h {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// The first 12 hex characters of a hash followed by "…", for logs and error messages.
pub fn short_hex(h: &Hash) -> String {
    let mut s = hex(h);
    s.truncate(12);
    s.push('…');
    s
}

/// One protocol message. The first five travel on the control stream, the
/// rest on a file stream (one bidirectional stream per file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    // Control stream.
    Hello(Hello),
    Welcome(Welcome),
    Refuse(Refuse),
    AgentHeartbeat(AgentHeartbeat),
    ReceiverHeartbeat(ReceiverHeartbeat),
    // File stream.
    Offer(Offer),
    Resume(Resume),
    Chunk(Chunk),
    ChunkAck(ChunkAck),
    Commit(Commit),
    Ack(Ack),
    Reject(Reject),
    /// Receiver → agent, after an offer without a file hash: it stores a file of that
    /// path and size, so it needs the hash to tell whether this is the same content.
    NeedHash,
    /// Agent → receiver, answers [`Message::NeedHash`]: the whole file's BLAKE3.
    FileHash(Hash),
    /// Agent → receiver, first frame of a *stripe stream*: it carries chunks of the file
    /// session of `path` that is open on another lane of the same agent (§3, "Striping
    /// one file").
    Attach(Attach),
    /// Receiver → agent, answers [`Message::Attach`]: the stripe stream may carry chunks.
    Attached,
}

impl Message {
    /// A stable lowercase name for the variant, for error messages and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::Refuse(_) => "refuse",
            Message::AgentHeartbeat(_) => "agent_heartbeat",
            Message::ReceiverHeartbeat(_) => "receiver_heartbeat",
            Message::Offer(_) => "offer",
            Message::Resume(_) => "resume",
            Message::Chunk(_) => "chunk",
            Message::ChunkAck(_) => "chunk_ack",
            Message::Commit(_) => "commit",
            Message::Ack(_) => "ack",
            Message::Reject(_) => "reject",
            Message::NeedHash => "need_hash",
            Message::FileHash(_) => "file_hash",
            Message::Attach(_) => "attach",
            Message::Attached => "attached",
        }
    }
}

/// Agent → receiver, first frame on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub agent_id: String,
    /// Feature bits; a receiver ignores bits it does not know.
    pub capabilities: u64,
    /// Which of its agent instance's connections this is; `None` from an agent that
    /// opens a single connection and does not say (docs/protocol.md §2, "Lanes").
    pub lane: Option<Lane>,
}

/// One of the connections (lanes) an agent process stripes its files over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lane {
    /// Drawn at random when the agent process starts: the receiver keeps the lanes of
    /// one instance side by side and supersedes all of an older instance's.
    pub instance: u64,
    /// This connection's index, `0..count`.
    pub index: u16,
    /// How many connections the instance keeps (`transfer.connections`).
    pub count: u16,
}

impl Lane {
    /// Whether the receiver can accept this lane: `index < count <= max`. The codec
    /// checks structure only; this is the meaning.
    pub fn check(&self, max: u16) -> Result<(), String> {
        if self.count == 0 || self.count > max {
            return Err(format!(
                "lane count {} is out of range (1..={max})",
                self.count
            ));
        }
        if self.index >= self.count {
            return Err(format!(
                "lane index {} is not below the lane count {}",
                self.index, self.count
            ));
        }
        Ok(())
    }
}

/// Receiver → agent, accepts a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub version: u16,
    pub receiver_id: String,
    /// How often the agent should send [`AgentHeartbeat`]s.
    pub heartbeat_interval_ms: u32,
}

/// Receiver → agent, declines a [`Hello`]; the receiver then closes the connection
/// with [`Refuse::close_reason`] as its reason, so that an agent that missed the frame
/// still learns the refusal ([`Refuse::from_close_reason`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refuse {
    pub code: ErrorCode,
    /// Human-readable diagnostic; only ever parsed back out of a close reason.
    pub reason: String,
}

impl Refuse {
    /// The connection close reason carrying this refusal: `"<code>: <reason>"`, e.g.
    /// `unauthorized: agent id "kiso-02" is not the name in the agent's certificate`.
    pub fn close_reason(&self) -> String {
        format!("{}: {}", self.code, self.reason)
    }

    /// The refusal in a close reason written by [`Refuse::close_reason`]; `None` when
    /// the text does not start with a code label and ": ". QUIC may have cut a long
    /// reason short, so the reason may end mid-word.
    pub fn from_close_reason(reason: &[u8]) -> Option<Refuse> {
        let text = String::from_utf8_lossy(reason);
        let (label, rest) = text.split_once(": ")?;
        Some(Refuse {
            code: ErrorCode::from_label(label)?,
            reason: rest.to_owned(),
        })
    }
}

/// Agent → receiver, periodic backlog report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentHeartbeat {
    pub seq: u64,
    pub pending_files: u64,
    pub pending_bytes: u64,
    pub oldest_pending_age_s: u64,
    pub send_rate_bps: u64,
    /// The agent's node load; `None` from an agent that does not send it.
    pub node_load: Option<NodeLoadSummary>,
}

/// Receiver → agent, periodic storage report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverHeartbeat {
    pub seq: u64,
    pub storage: StorageState,
    pub free_bytes: u64,
    /// The receiver's node load and stall start; `None` from a receiver that does not
    /// send them.
    pub node: Option<ReceiverNode>,
}

/// The trailing group of a [`ReceiverHeartbeat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiverNode {
    pub load: NodeLoadSummary,
    /// When the current storage stall began, seconds since the Unix epoch; 0 when the
    /// storage is not stalled.
    pub stalled_since_s: u64,
}

/// A heartbeat's compact view of a node's load. Ratios in basis points (1/100 of a
/// percent: 10 000 is all of the time); `None` where the node does not offer it (no PSI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeLoadSummary {
    /// CPU steal between the last two samples.
    pub steal_bp: Option<u16>,
    /// PSI `some avg10` for cpu and io.
    pub pressure_cpu_bp: Option<u16>,
    pub pressure_io_bp: Option<u16>,
    /// The 1-minute load average times 100.
    pub load1_centi: Option<u32>,
}

impl NodeLoadSummary {
    /// A ratio (0..=1) in basis points.
    pub fn bp_of_ratio(r: f64) -> u16 {
        (r.clamp(0.0, 1.0) * 10_000.0).round() as u16
    }

    /// A percentage (PSI's avg10) in basis points.
    pub fn bp_of_percent(p: f64) -> u16 {
        Self::bp_of_ratio(p / 100.0)
    }

    pub fn centi(v: f64) -> u32 {
        (v.max(0.0) * 100.0).round().min(f64::from(u32::MAX - 1)) as u32
    }
}

/// Agent → receiver, first frame on a file stream: the file it wants to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// Relative path, '/'-separated; the receiver validates it.
    pub path: String,
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch (negative before it).
    pub mtime_ns: i64,
    /// The whole file's BLAKE3 when the agent knows it already (a file it hashed
    /// before); otherwise the receiver asks for it only if it needs it.
    pub file_hash: Option<Hash>,
    /// A power of two within `MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE`.
    pub chunk_size: u32,
}

/// Agent → receiver, first frame of a stripe stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach {
    /// The path of a file session open on another stream of this agent.
    pub path: String,
}

/// Receiver → agent, answers an [`Offer`] with the chunks it still needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// Chunk index ranges still missing. Each range is non-empty.
    pub missing: Vec<ChunkRange>,
}

/// Agent → receiver, one chunk of the offered file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub index: u32,
    pub codec: Codec,
    /// Length of the chunk before compression.
    pub raw_len: u32,
    /// BLAKE3 value of the raw (uncompressed) chunk at its index
    /// ([`crate::chunk::chunk_value`]): the chaining value of its subtree, or the file's
    /// BLAKE3 for a file of one chunk.
    pub chunk_hash: Hash,
    /// The chunk as encoded by `codec`.
    pub payload: Bytes,
}

/// Receiver → agent, chunk `index` is verified and written to the partial file. The
/// agent keeps at most its window of chunks unacknowledged per file, which bounds what
/// an interruption can cost (guarantee 4) and the memory held per stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkAck {
    pub index: u32,
}

/// Agent → receiver, all requested chunks have been sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub chunks_sent: u32,
    /// The whole file's BLAKE3, derived by the agent from the values of all its chunks.
    pub file_hash: Hash,
}

/// Receiver → agent, the file is durably stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub stored_path: String,
    /// The receiver already had an identical file and stored nothing new.
    pub already_stored: bool,
}

/// Receiver → agent, the file was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub code: ErrorCode,
    /// Human-readable diagnostic; never parsed.
    pub reason: String,
}

/// A half-open range `[start, end)` of chunk indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRange {
    pub start: u32,
    pub end: u32,
}

impl ChunkRange {
    /// Number of chunks in the range (0 if `end <= start`).
    pub fn len(&self) -> u32 {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a chunk payload is encoded. One byte on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
    /// 16-bit byte-shuffle, then zstd (`compress::shuffle`): for FITS files of 16-bit
    /// pixels.
    ZstdShuffle16 = 2,
}

impl Codec {
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Zstd),
            2 => Some(Codec::ZstdShuffle16),
            _ => None,
        }
    }
}

/// The receiver's view of its storage. One byte on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StorageState {
    Ok = 0,
    /// Writes are not making progress (e.g. a hung mount).
    Stalled = 1,
    Full = 2,
}

impl StorageState {
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(StorageState::Ok),
            1 => Some(StorageState::Stalled),
            2 => Some(StorageState::Full),
            _ => None,
        }
    }
}

/// Why a session or a file was refused. A `u16` on the wire.
///
/// Unknown numbers decode to `Other` so that newer peers can add codes.
/// `Other(n)` with a known `n` (e.g. `Other(1)`) is not canonical: it encodes
/// as `n` and decodes as the named variant; use [`ErrorCode::from_u16`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadPath,
    TooLarge,
    StorageFull,
    StorageError,
    HashMismatch,
    ChunkMismatch,
    Protocol,
    VersionMismatch,
    Unauthorized,
    Busy,
    ShuttingDown,
    Other(u16),
}

impl ErrorCode {
    pub fn as_u16(self) -> u16 {
        match self {
            ErrorCode::BadPath => 1,
            ErrorCode::TooLarge => 2,
            ErrorCode::StorageFull => 3,
            ErrorCode::StorageError => 4,
            ErrorCode::HashMismatch => 5,
            ErrorCode::ChunkMismatch => 6,
            ErrorCode::Protocol => 7,
            ErrorCode::VersionMismatch => 8,
            ErrorCode::Unauthorized => 9,
            ErrorCode::Busy => 10,
            ErrorCode::ShuttingDown => 11,
            ErrorCode::Other(n) => n,
        }
    }

    pub fn from_u16(v: u16) -> Self {
        match v {
            1 => ErrorCode::BadPath,
            2 => ErrorCode::TooLarge,
            3 => ErrorCode::StorageFull,
            4 => ErrorCode::StorageError,
            5 => ErrorCode::HashMismatch,
            6 => ErrorCode::ChunkMismatch,
            7 => ErrorCode::Protocol,
            8 => ErrorCode::VersionMismatch,
            9 => ErrorCode::Unauthorized,
            10 => ErrorCode::Busy,
            11 => ErrorCode::ShuttingDown,
            n => ErrorCode::Other(n),
        }
    }

    /// Whether sending the same file (or reconnecting) later may succeed.
    ///
    /// False when the request itself is wrong and will be refused again;
    /// unknown codes count as retryable so a newer peer cannot make an agent
    /// drop data.
    pub fn is_retryable(self) -> bool {
        !matches!(
            self,
            ErrorCode::BadPath
                | ErrorCode::TooLarge
                | ErrorCode::Protocol
                | ErrorCode::VersionMismatch
                | ErrorCode::Unauthorized
        )
    }

    /// The code whose [`Display`](fmt::Display) form is `label` (`busy`, `other(42)`).
    pub fn from_label(label: &str) -> Option<ErrorCode> {
        if let Some(n) = label
            .strip_prefix("other(")
            .and_then(|rest| rest.strip_suffix(')'))
        {
            return n.parse().ok().map(ErrorCode::from_u16);
        }
        (1..=11)
            .map(ErrorCode::from_u16)
            .find(|code| code.as_str() == label)
    }

    /// A stable snake_case label, safe as a metric label value (bounded set).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadPath => "bad_path",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::StorageFull => "storage_full",
            ErrorCode::StorageError => "storage_error",
            ErrorCode::HashMismatch => "hash_mismatch",
            ErrorCode::ChunkMismatch => "chunk_mismatch",
            ErrorCode::Protocol => "protocol",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Busy => "busy",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Other(_) => "other",
        }
    }
}

impl fmt::Display for ErrorCode {
    /// The label, plus the number for codes this build does not know.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::Other(n) => write!(f, "other({n})"),
            code => f.write_str(code.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_survives_the_trip_through_a_close_reason() {
        for n in 1..=12u16 {
            let refuse = Refuse {
                code: ErrorCode::from_u16(n),
                reason: "agent id \"kiso-02\" is not the name: in the certificate".into(),
            };
            let text = refuse.close_reason();
            assert_eq!(
                Refuse::from_close_reason(text.as_bytes()),
                Some(refuse),
                "{text}"
            );
        }
        assert_eq!(
            Refuse::from_close_reason(b"unauthorized: no").map(|r| r.code),
            Some(ErrorCode::Unauthorized)
        );
        assert_eq!(Refuse::from_close_reason(b"receiver shutting down"), None);
        assert_eq!(Refuse::from_close_reason(b"nonsense: text"), None);
        assert_eq!(ErrorCode::from_label("other(x)"), None);
    }

    #[test]
    fn hex_forms() {
        let mut h = [0u8; 32];
        h[0] = 0x3a;
        h[1] = 0x9f;
        h[31] = 0x01;
        let full = hex(&h);
        assert_eq!(full.len(), 64);
        assert!(full.starts_with("3a9f0000"));
        assert!(full.ends_with("01"));
        assert_eq!(short_hex(&h), "3a9f00000000…");
    }

    #[test]
    fn error_code_numbers_round_trip_and_unknown_is_other() {
        for n in 0..=u16::MAX {
            let code = ErrorCode::from_u16(n);
            assert_eq!(code.as_u16(), n);
            assert_eq!(matches!(code, ErrorCode::Other(_)), !(1..=11).contains(&n));
        }
        assert_eq!(ErrorCode::from_u16(3), ErrorCode::StorageFull);
    }

    #[test]
    fn error_code_labels_are_distinct_and_retryability_matches_spec() {
        let known: Vec<ErrorCode> = (1..=11).map(ErrorCode::from_u16).collect();
        let mut labels: Vec<&str> = known.iter().map(|c| c.as_str()).collect();
        labels.push(ErrorCode::Other(500).as_str());
        let mut dedup = labels.clone();
        dedup.sort_unstable();
        dedup.dedup();
        assert_eq!(
            dedup.len(),
            labels.len(),
            "labels must be distinct: {labels:?}"
        );

        let permanent: Vec<&str> = known
            .iter()
            .filter(|c| !c.is_retryable())
            .map(|c| c.as_str())
            .collect();
        assert_eq!(
            permanent,
            [
                "bad_path",
                "too_large",
                "protocol",
                "version_mismatch",
                "unauthorized"
            ]
        );
        assert!(ErrorCode::Other(500).is_retryable());
        assert_eq!(ErrorCode::Busy.to_string(), "busy");
        assert_eq!(ErrorCode::Other(500).to_string(), "other(500)");
    }

    #[test]
    fn codec_and_storage_state_bytes() {
        for v in 0..=u8::MAX {
            if let Some(c) = Codec::from_u8(v) {
                assert_eq!(c.as_u8(), v);
            }
            if let Some(s) = StorageState::from_u8(v) {
                assert_eq!(s.as_u8(), v);
            }
        }
        assert_eq!(Codec::from_u8(2), Some(Codec::ZstdShuffle16));
        assert_eq!(Codec::from_u8(3), None);
        assert_eq!(StorageState::from_u8(3), None);
    }

    #[test]
    fn chunk_range_len() {
        assert_eq!(ChunkRange { start: 3, end: 7 }.len(), 4);
        assert!(ChunkRange { start: 7, end: 7 }.is_empty());
        assert!(ChunkRange { start: 8, end: 7 }.is_empty());
    }
}
