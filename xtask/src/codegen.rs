//! Generated files: the golden vectors of every codec, and `docs/wire-format.md`.
//!
//! Both come from one source, `rylm_message::samples`, so the document always shows the bytes
//! the codecs really write. `check` compares the files on disk with what would be written.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use bytes::BytesMut;
use rylm_message::msgpack::{MsgpackKind, walk_msgpack};
use rylm_message::samples::{self, Sample};
use rylm_message::{
    Codec, JsonCodec, MARKER, Message, NativeCodec, PylmCodec, StreamCodec, WIRE_VERSION,
};
use tokio_util::codec::Encoder;

const VECTORS: &str = "crates/message/vectors";
const WIRE_DOC: &str = "docs/wire-format.md";

/// Each codec's folder and file extension under `VECTORS`.
const CODECS: [(&str, &str); 3] = [("native", "msgpack"), ("json", "json"), ("pylm", "pb")];

fn codec(name: &str) -> Box<dyn Codec> {
    match name {
        "native" => Box::new(NativeCodec::default()),
        "json" => Box::new(JsonCodec::default()),
        _ => Box::new(PylmCodec::default()),
    }
}

/// Every generated file, as (path from the workspace root, content).
fn render() -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut files = Vec::new();
    for sample in samples::all() {
        for (name, extension) in CODECS {
            let body = codec(name)
                .encode(&sample.message)
                .with_context(|| format!("encoding sample {} with {name}", sample.name))?;
            files.push((
                Path::new(VECTORS)
                    .join(name)
                    .join(format!("{}.{extension}", sample.name)),
                body.to_vec(),
            ));
        }
    }
    files.push((PathBuf::from(WIRE_DOC), wire_doc()?.into_bytes()));
    Ok(files)
}

/// Writes every generated file, and removes vectors that no sample produces any more.
pub fn write() -> Result<()> {
    let files = render()?;
    for path in leftovers(&files)? {
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        eprintln!("xtask: removed {}", path.display());
    }
    for (path, content) in &files {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if std::fs::read(path).ok().as_deref() != Some(content.as_slice()) {
            std::fs::write(path, content).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("xtask: wrote {}", path.display());
        }
    }
    Ok(())
}

/// The generated files that are missing, differ, or should not be there.
pub fn check() -> Result<Vec<String>> {
    let files = render()?;
    let mut stale: Vec<String> = files
        .iter()
        .filter(|(path, content)| std::fs::read(path).ok().as_deref() != Some(content.as_slice()))
        .map(|(path, _)| path.display().to_string())
        .collect();
    stale.extend(
        leftovers(&files)?
            .iter()
            .map(|p| format!("{} (no longer generated)", p.display())),
    );
    Ok(stale)
}

fn leftovers(files: &[(PathBuf, Vec<u8>)]) -> Result<Vec<PathBuf>> {
    let expected: BTreeSet<&PathBuf> = files.iter().map(|(path, _)| path).collect();
    let mut extra = Vec::new();
    for (name, _) in CODECS {
        let dir = Path::new(VECTORS).join(name);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = dir.join(entry?.file_name());
            if !expected.contains(&path) {
                extra.push(path);
            }
        }
    }
    Ok(extra)
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A hex cell for a table: long contents are cut, with the count of bytes left out.
fn hex_cell(head: &[u8], data: &[u8]) -> String {
    const SHOWN: usize = 12;
    let mut cell = hex(head);
    if !data.is_empty() {
        cell.push(' ');
        cell.push_str(&hex(&data[..data.len().min(SHOWN)]));
        if data.len() > SHOWN {
            let _ = write!(cell, " … (+{} bytes)", data.len() - SHOWN);
        }
    }
    cell
}

/// What a MessagePack item is, in words.
fn describe(kind: MsgpackKind, head: &[u8], data: &[u8]) -> String {
    let marker = head.first().copied().unwrap_or(0);
    match kind {
        MsgpackKind::Map(n) if marker <= 0x8f => format!("fixmap, {n} entries"),
        MsgpackKind::Map(n) => format!("map, {n} entries"),
        MsgpackKind::Array(n) if marker <= 0x9f => format!("fixarray, {n} items"),
        MsgpackKind::Array(n) => format!("array, {n} items"),
        MsgpackKind::Str => {
            let text = String::from_utf8_lossy(data);
            let shown: String = text.chars().take(24).collect();
            let cut = if text.chars().count() > 24 { "…" } else { "" };
            let form = if marker <= 0xbf { "fixstr" } else { "str" };
            format!("{form}, {} bytes: `{shown}{cut}`", data.len())
        }
        MsgpackKind::Bin => format!("bin, {} bytes", data.len()),
        MsgpackKind::Uint(n) if marker <= 0x7f => format!("positive fixint {n}"),
        MsgpackKind::Uint(n) => format!("uint {n}"),
        MsgpackKind::Int(n) => format!("int {n}"),
        MsgpackKind::Nil => "nil".into(),
        MsgpackKind::Bool(b) => format!("{b}"),
        MsgpackKind::F32(f) => format!("float32 {f}"),
        MsgpackKind::F64(f) => format!("float64 {f}"),
        MsgpackKind::Ext(t) => format!("ext type {t}, {} bytes", data.len()),
    }
}

/// A byte-by-byte table of one native body.
fn annotate(body: &[u8]) -> Result<String> {
    let mut table = String::from("| offset | bytes | meaning |\n|---:|---|---|\n");
    let mut rows = Vec::new();
    let end = walk_msgpack(body, |item| {
        let indent = "&nbsp;&nbsp;".repeat(item.depth);
        rows.push(format!(
            "| {} | `{}` | {indent}{} |\n",
            item.offset,
            hex_cell(item.head, item.data),
            describe(item.kind, item.head, item.data)
        ));
    })
    .context("annotating a native body")?;
    anyhow::ensure!(end == body.len(), "a native body has trailing bytes");
    for row in rows {
        table.push_str(&row);
    }
    Ok(table)
}

fn find(name: &str) -> Result<Sample> {
    samples::all()
        .into_iter()
        .find(|s| s.name == name)
        .with_context(|| format!("no sample named {name}"))
}

fn wire_doc() -> Result<String> {
    let native = NativeCodec::default();
    let call = find("call")?;
    let stages = find("stages")?;
    let call_body = native.encode(&call.message)?;
    let stages_body = native.encode(&stages.message)?;
    let mut stream = BytesMut::new();
    StreamCodec::default().encode(&call.message, &mut stream)?;
    let pylm_call = PylmCodec::default().encode(&call.message)?;
    let json_call = JsonCodec::default().encode(&call.message)?;

    let mut doc = String::new();
    let w = &mut doc;
    writeln!(
        w,
        "<!-- Generated by `cargo xtask codegen` from rylm_message::samples; do not edit. -->"
    )?;
    writeln!(w, "# rylm wire format, version {WIRE_VERSION}\n")?;
    writeln!(
        w,
        "Every rylm message is one envelope, `rylm_message::Message`. This page shows the bytes \
         the native codec writes for it, on ZeroMQ and on byte streams, and how the JSON and pylm \
         codecs carry the same envelope. Every example below is generated from the samples in \
         `crates/message/src/samples.rs`, whose encodings are also kept as golden vectors in \
         `crates/message/vectors/`; a test fails when either is stale.\n"
    )?;
    writeln!(w, "## The envelope\n")?;
    writeln!(w, "| field | MessagePack type | meaning |\n|---|---|---|")?;
    for (field, ty, meaning) in [
        ("pipeline", "str", "the stream id: one per client session"),
        (
            "client",
            "str",
            "the client's id; also the topic its results are published on",
        ),
        (
            "stage",
            "uint (0 to 2^32-1)",
            "the current stage, an index into `function` when it is a list",
        ),
        (
            "function",
            "str, or array of str",
            "`server.method`, or a list of them that runs as a pipeline",
        ),
        (
            "cache",
            "str",
            "a cache key, or a per-message id set by inbound parts",
        ),
        (
            "headers",
            "map of str to str",
            "free-form metadata (HTTP headers, query parameters, error details)",
        ),
        (
            "payload",
            "bin",
            "the opaque payload; never an array of integers",
        ),
    ] {
        writeln!(w, "| `{field}` | {ty} | {meaning} |")?;
    }
    writeln!(
        w,
        "\nThe body is a MessagePack map with these named fields, written in this order. A reader \
         takes a missing field as empty (zero for `stage`) and skips fields it does not know, so a \
         later version can add fields; it refuses a body with bytes after the map, a field of the \
         wrong type, or a body above its size limit (16 MiB by default), which it checks before \
         decoding anything.\n"
    )?;

    writeln!(w, "## On ZeroMQ: two frames\n")?;
    writeln!(
        w,
        "A native message is a multipart message of two frames, after whatever routing frames the \
         socket pattern adds (a PUB topic, a ROUTER identity):\n"
    )?;
    writeln!(w, "| frame | bytes | meaning |\n|---|---|---|")?;
    writeln!(
        w,
        "| 1, the marker | `{}` | `RYLM` in ASCII, then the wire version, {WIRE_VERSION} |",
        hex(&MARKER)
    )?;
    writeln!(w, "| 2, the body | the MessagePack map | the envelope |\n")?;
    writeln!(
        w,
        "A reader checks the marker first. A frame that does not start with `RYLM` is another \
         protocol (a pylm peer sends a single protobuf frame) and gets the error *not a rylm \
         message*, with the first bytes it found; `RYLM` with another version byte gets *the peer \
         speaks rylm wire version N*. Neither is read as garbage.\n"
    )?;
    writeln!(w, "### Example: {}\n", call.about)?;
    writeln!(w, "```rust\n{:#?}\n```\n", DebugMessage(&call.message))?;
    writeln!(
        w,
        "Frame 2, {} bytes:\n\n```\n{}\n```\n",
        call_body.len(),
        hex(&call_body)
    )?;
    writeln!(w, "Byte by byte:\n\n{}", annotate(&call_body)?)?;
    writeln!(w, "### Example: {}\n", stages.about)?;
    writeln!(
        w,
        "A list of stages is an array of strings; `stage` 1 selects `store.save`.\n\n{}",
        annotate(&stages_body)?
    )?;

    writeln!(w, "## On byte streams: a length prefix\n")?;
    writeln!(
        w,
        "On a byte stream (TCP, a Unix socket, a pipe) each message is a 4-byte big-endian length \
         `N`, then `N` bytes: the 5-byte marker and the body. A reader refuses a length above its \
         limit as soon as the prefix arrives, before it allocates anything, and the stream ends \
         there. The call above on a stream, {} bytes:\n",
        stream.len()
    )?;
    writeln!(w, "| offset | bytes | meaning |\n|---:|---|---|")?;
    writeln!(
        w,
        "| 0 | `{}` | length: {} bytes follow |",
        hex(&stream[..4]),
        stream.len() - 4
    )?;
    writeln!(w, "| 4 | `{}` | the marker |", hex(&stream[4..9]))?;
    writeln!(
        w,
        "| 9 | `{}` | the body, as above |\n",
        hex_cell(&[], &stream[9..])
    )?;

    writeln!(w, "## JSON\n")?;
    writeln!(
        w,
        "The JSON codec writes the same fields as one object, with the payload in base64 (standard \
         alphabet, padded), as Go's `encoding/json` writes byte slices. The call above:\n"
    )?;
    writeln!(w, "```json\n{}\n```\n", String::from_utf8_lossy(&json_call))?;

    writeln!(w, "## pylm's PalmMessage\n")?;
    writeln!(
        w,
        "The pylm codec (feature `pylm`) writes pylm 0.13+'s proto3 `PalmMessage`, one frame per \
         message, for mixed clusters with real pylm peers:\n"
    )?;
    writeln!(
        w,
        "```proto\nmessage PalmMessage {{ string pipeline = 1; string client = 2; int64 stage = 3;\n                      string function = 4; string cache = 5; bytes payload = 6; }}\n```\n"
    )?;
    writeln!(
        w,
        "A list of stages travels as pylm writes it, names joined by single spaces, and a function \
         string with whitespace in it is read back as a list. pylm has no headers: they are not \
         written. A name pylm would split differently (one with whitespace, or an empty stage) is \
         refused rather than sent garbled, and a negative `stage` from a peer is refused on \
         reading. Proto3 leaves default values (empty strings, stage 0) off the wire. The call \
         above, {} bytes:\n\n```\n{}\n```\n",
        pylm_call.len(),
        hex(&pylm_call)
    )?;

    writeln!(w, "## Golden vectors\n")?;
    writeln!(
        w,
        "| sample | what it shows | native | json | pylm |\n|---|---|---:|---:|---:|"
    )?;
    for sample in samples::all() {
        let mut sizes = Vec::new();
        for (name, _) in CODECS {
            sizes.push(codec(name).encode(&sample.message)?.len());
        }
        writeln!(
            w,
            "| `{}` | {} | {} B | {} B | {} B |",
            sample.name, sample.about, sizes[0], sizes[1], sizes[2]
        )?;
    }
    writeln!(
        w,
        "\nThe files are `crates/message/vectors/<codec>/<sample>.<ext>`: `native/*.msgpack` are \
         bodies without the marker, `json/*.json`, `pylm/*.pb`."
    )?;
    Ok(doc)
}

/// The sample as Rust builder calls, for the document.
struct DebugMessage<'a>(&'a Message);

impl std::fmt::Debug for DebugMessage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "Message::call({:?}, {:?})",
            m.function.to_string(),
            String::from_utf8_lossy(&m.payload)
        )?;
        if !m.pipeline.is_empty() {
            write!(f, "\n    .with_pipeline({:?})", m.pipeline)?;
        }
        if !m.client.is_empty() {
            write!(f, "\n    .with_client({:?})", m.client)?;
        }
        Ok(())
    }
}
