//! A MessagePack structure walker: finds where a value ends and names each of its parts.
//!
//! The native codec uses it to refuse trailing bytes after a body, and the wire-format
//! documentation is generated with it, byte by byte. It is iterative (a hostile input cannot
//! exhaust the stack) and allocates only a small stack of container counts.

use crate::Error;

/// How deep containers may nest before the walker gives up.
const MAX_DEPTH: usize = 256;

/// What one MessagePack item is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MsgpackKind {
    /// `nil`.
    Nil,
    /// `true` or `false`.
    Bool(bool),
    /// A non-negative integer.
    Uint(u64),
    /// A negative integer.
    Int(i64),
    /// A 32-bit float.
    F32(f32),
    /// A 64-bit float.
    F64(f64),
    /// A UTF-8 string (its bytes are the item's `data`).
    Str,
    /// A byte string (its bytes are the item's `data`).
    Bin,
    /// An extension value of the given type (its bytes are the item's `data`).
    Ext(i8),
    /// An array of `len` items, which follow.
    Array(u32),
    /// A map of `len` key-value pairs, which follow.
    Map(u32),
}

/// One item met by [`walk_msgpack`].
#[derive(Clone, Copy, Debug)]
pub struct MsgpackItem<'a> {
    /// Where the item starts in the walked buffer.
    pub offset: usize,
    /// Nesting depth: 0 for the top-level value.
    pub depth: usize,
    /// The marker byte and any length or value bytes that follow it.
    pub head: &'a [u8],
    /// The content of a string, byte string or extension; empty for other kinds.
    pub data: &'a [u8],
    /// What the item is.
    pub kind: MsgpackKind,
}

/// Writes the head of a map of `len` pairs.
pub(crate) fn write_map_head(out: &mut Vec<u8>, len: usize) {
    write_container_head(out, len, [0x80, 0xde, 0xdf]);
}

/// Writes the head of an array of `len` items.
pub(crate) fn write_array_head(out: &mut Vec<u8>, len: usize) {
    write_container_head(out, len, [0x90, 0xdc, 0xdd]);
}

/// A map's or an array's head: its short form (the length in the marker's low four bits), or
/// its 16-bit or 32-bit marker and length.
fn write_container_head(out: &mut Vec<u8>, len: usize, [short, wide16, wide32]: [u8; 3]) {
    match u16::try_from(len) {
        Ok(len) if len < 16 => out.push(short | len as u8),
        Ok(len) => {
            out.push(wide16);
            out.extend_from_slice(&len.to_be_bytes());
        }
        Err(_) => {
            out.push(wide32);
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
    }
}

/// Writes an unsigned integer in its shortest form, as MessagePack writers do.
pub(crate) fn write_uint(out: &mut Vec<u8>, value: u64) {
    if value < 128 {
        out.push(value as u8);
    } else if let Ok(value) = u8::try_from(value) {
        out.extend_from_slice(&[0xcc, value]);
    } else if let Ok(value) = u16::try_from(value) {
        out.push(0xcd);
        out.extend_from_slice(&value.to_be_bytes());
    } else if let Ok(value) = u32::try_from(value) {
        out.push(0xce);
        out.extend_from_slice(&value.to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&value.to_be_bytes());
    }
}

/// Writes a string: its head, then its bytes.
pub(crate) fn write_str(out: &mut Vec<u8>, text: &str) {
    let len = text.len();
    if len < 32 {
        out.push(0xa0 | len as u8);
    } else if let Ok(len) = u8::try_from(len) {
        out.push(0xd9);
        out.push(len);
    } else if let Ok(len) = u16::try_from(len) {
        out.push(0xda);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(0xdb);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
    out.extend_from_slice(text.as_bytes());
}

/// Writes a byte string: its head, then `data`.
pub(crate) fn write_bin(out: &mut Vec<u8>, data: &[u8]) {
    if let Ok(len) = u8::try_from(data.len()) {
        out.push(0xc4);
        out.push(len);
    } else if let Ok(len) = u16::try_from(data.len()) {
        out.push(0xc5);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(0xc6);
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
}

/// Walks the one MessagePack value at the start of `buf`, calling `visit` for each item in
/// order, and returns how many bytes the value takes.
///
/// ```
/// use rylm_message::msgpack::walk_msgpack;
/// // {"a": [1, 2]} followed by one stray byte
/// let buf = [0x81, 0xa1, b'a', 0x92, 0x01, 0x02, 0xff];
/// let mut items = 0;
/// assert_eq!(walk_msgpack(&buf, |_| items += 1).unwrap(), 6);
/// assert_eq!(items, 5);
/// ```
pub fn walk_msgpack<'a>(
    buf: &'a [u8],
    mut visit: impl FnMut(MsgpackItem<'a>),
) -> Result<usize, Error> {
    // Items still expected at each open container level; the bottom entry is the top value.
    let mut pending: Vec<u64> = vec![1];
    let mut pos = 0usize;
    while let Some(remaining) = pending.last_mut() {
        if *remaining == 0 {
            pending.pop();
            continue;
        }
        *remaining -= 1;
        let depth = pending.len() - 1;
        let item = read_item(buf, pos, depth)?;
        pos = item.offset + item.head.len() + item.data.len();
        let children = match item.kind {
            MsgpackKind::Array(len) => u64::from(len),
            MsgpackKind::Map(len) => 2 * u64::from(len),
            _ => 0,
        };
        visit(item);
        if children > 0 {
            if pending.len() > MAX_DEPTH {
                return Err(Error::malformed(
                    "msgpack",
                    format!("containers nest deeper than {MAX_DEPTH} levels"),
                ));
            }
            pending.push(children);
        }
    }
    Ok(pos)
}

pub(crate) fn read_item(buf: &[u8], offset: usize, depth: usize) -> Result<MsgpackItem<'_>, Error> {
    let truncated = || {
        Error::malformed(
            "msgpack",
            format!("input ends inside the item at byte {offset}"),
        )
    };
    let marker = *buf.get(offset).ok_or_else(truncated)?;
    let be = |width: usize| -> Result<u64, Error> {
        let bytes = buf
            .get(offset + 1..offset + 1 + width)
            .ok_or_else(truncated)?;
        Ok(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    };
    // (bytes after the marker in the head, kind, content length)
    let (extra, kind, data_len): (usize, MsgpackKind, u64) = match marker {
        0x00..=0x7f => (0, MsgpackKind::Uint(u64::from(marker)), 0),
        0x80..=0x8f => (0, MsgpackKind::Map(u32::from(marker & 0x0f)), 0),
        0x90..=0x9f => (0, MsgpackKind::Array(u32::from(marker & 0x0f)), 0),
        0xa0..=0xbf => (0, MsgpackKind::Str, u64::from(marker & 0x1f)),
        0xc0 => (0, MsgpackKind::Nil, 0),
        0xc2 => (0, MsgpackKind::Bool(false), 0),
        0xc3 => (0, MsgpackKind::Bool(true), 0),
        0xc4 => (1, MsgpackKind::Bin, be(1)?),
        0xc5 => (2, MsgpackKind::Bin, be(2)?),
        0xc6 => (4, MsgpackKind::Bin, be(4)?),
        0xc7 => (2, MsgpackKind::Ext(ext_type(buf, offset + 2)?), be(1)?),
        0xc8 => (3, MsgpackKind::Ext(ext_type(buf, offset + 3)?), be(2)?),
        0xc9 => (5, MsgpackKind::Ext(ext_type(buf, offset + 5)?), be(4)?),
        0xca => (4, MsgpackKind::F32(f32::from_bits(be(4)? as u32)), 0),
        0xcb => (8, MsgpackKind::F64(f64::from_bits(be(8)?)), 0),
        0xcc => (1, MsgpackKind::Uint(be(1)?), 0),
        0xcd => (2, MsgpackKind::Uint(be(2)?), 0),
        0xce => (4, MsgpackKind::Uint(be(4)?), 0),
        0xcf => (8, MsgpackKind::Uint(be(8)?), 0),
        0xd0 => (1, MsgpackKind::Int(i64::from(be(1)? as u8 as i8)), 0),
        0xd1 => (2, MsgpackKind::Int(i64::from(be(2)? as u16 as i16)), 0),
        0xd2 => (4, MsgpackKind::Int(i64::from(be(4)? as u32 as i32)), 0),
        0xd3 => (8, MsgpackKind::Int(be(8)? as i64), 0),
        0xd4..=0xd8 => (
            1,
            MsgpackKind::Ext(ext_type(buf, offset + 1)?),
            1u64 << (marker - 0xd4),
        ),
        0xd9 => (1, MsgpackKind::Str, be(1)?),
        0xda => (2, MsgpackKind::Str, be(2)?),
        0xdb => (4, MsgpackKind::Str, be(4)?),
        0xdc => (2, MsgpackKind::Array(be(2)? as u32), 0),
        0xdd => (4, MsgpackKind::Array(be(4)? as u32), 0),
        0xde => (2, MsgpackKind::Map(be(2)? as u32), 0),
        0xdf => (4, MsgpackKind::Map(be(4)? as u32), 0),
        0xe0..=0xff => (0, MsgpackKind::Int(i64::from(marker as i8)), 0),
        0xc1 => {
            return Err(Error::malformed(
                "msgpack",
                format!("byte 0xc1 at {offset} is never used by MessagePack"),
            ));
        }
    };
    let head_end = offset + 1 + extra;
    let head = buf.get(offset..head_end).ok_or_else(truncated)?;
    let data_end = usize::try_from(data_len)
        .ok()
        .and_then(|len| head_end.checked_add(len))
        .ok_or_else(truncated)?;
    let data = buf.get(head_end..data_end).ok_or_else(truncated)?;
    Ok(MsgpackItem {
        offset,
        depth,
        head,
        data,
        kind,
    })
}

fn ext_type(buf: &[u8], at: usize) -> Result<i8, Error> {
    buf.get(at).map(|b| *b as i8).ok_or_else(|| {
        Error::malformed(
            "msgpack",
            format!("input ends inside an extension header at byte {at}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(buf: &[u8]) -> Vec<MsgpackKind> {
        let mut out = Vec::new();
        walk_msgpack(buf, |item| out.push(item.kind)).expect("valid msgpack");
        out
    }

    #[test]
    fn reads_scalars_of_every_width() {
        assert_eq!(kinds(&[0xcd, 0x01, 0x00]), vec![MsgpackKind::Uint(256)]);
        assert_eq!(kinds(&[0xd0, 0xff]), vec![MsgpackKind::Int(-1)]);
        assert_eq!(kinds(&[0xf0]), vec![MsgpackKind::Int(-16)]);
        assert_eq!(kinds(&[0xc3]), vec![MsgpackKind::Bool(true)]);
        assert_eq!(kinds(&[0xd4, 0x05, 0x00]), vec![MsgpackKind::Ext(5)]);
    }

    #[test]
    fn nested_containers_and_lengths() {
        // [[], {"k": bin(2)}]
        let buf = [0x92, 0x90, 0x81, 0xa1, b'k', 0xc4, 0x02, 0xaa, 0xbb];
        assert_eq!(walk_msgpack(&buf, |_| ()).expect("valid"), buf.len());
        assert_eq!(
            kinds(&buf),
            vec![
                MsgpackKind::Array(2),
                MsgpackKind::Array(0),
                MsgpackKind::Map(1),
                MsgpackKind::Str,
                MsgpackKind::Bin
            ]
        );
    }

    #[test]
    fn refuses_truncation_reserved_byte_and_deep_nesting() {
        assert!(walk_msgpack(&[0xc4, 0x05, 0x00], |_| ()).is_err());
        assert!(walk_msgpack(&[0xdb, 0xff, 0xff, 0xff, 0xff], |_| ()).is_err());
        assert!(walk_msgpack(&[0xc1], |_| ()).is_err());
        assert!(walk_msgpack(&[], |_| ()).is_err());
        assert!(walk_msgpack(&[0x91; 10_000], |_| ()).is_err());
        // A huge announced array on a tiny input ends with an error, not a long loop.
        assert!(walk_msgpack(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01], |_| ()).is_err());
    }
}
