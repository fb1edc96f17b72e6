//! A small blocking Redis client speaking RESP2 over TCP: commands are arrays of bulk
//! strings, replies are parsed fully (simple strings, errors, integers, bulk strings, arrays),
//! and several commands can be pipelined in one round trip.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::StoreError;

/// Largest bulk reply accepted (Redis's own `proto-max-bulk-len` default).
const MAX_BULK: usize = 512 << 20;

/// A parsed reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `+OK`.
    Simple(String),
    /// `-ERR ...`.
    Error(String),
    /// `:42`.
    Int(i64),
    /// `$n` bytes, or nil (`$-1`).
    Bulk(Option<Vec<u8>>),
    /// `*n` replies, or nil (`*-1`).
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// Turns a `-ERR` reply into an error.
    pub fn ok(self) -> Result<Reply, StoreError> {
        match self {
            Reply::Error(e) => Err(StoreError::Redis(e)),
            other => Ok(other),
        }
    }

    /// The integer of an `:n` reply.
    pub fn int(self) -> Result<i64, StoreError> {
        match self.ok()? {
            Reply::Int(n) => Ok(n),
            other => Err(StoreError::Redis(format!(
                "expected an integer, got {other:?}"
            ))),
        }
    }

    /// The bytes of a bulk reply (`None` for nil).
    pub fn bulk(self) -> Result<Option<Vec<u8>>, StoreError> {
        match self.ok()? {
            Reply::Bulk(b) => Ok(b),
            other => Err(StoreError::Redis(format!(
                "expected a bulk string, got {other:?}"
            ))),
        }
    }

    /// The elements of an array reply (empty for nil).
    pub fn array(self) -> Result<Vec<Reply>, StoreError> {
        match self.ok()? {
            Reply::Array(a) => Ok(a.unwrap_or_default()),
            other => Err(StoreError::Redis(format!(
                "expected an array, got {other:?}"
            ))),
        }
    }
}

/// One connection.
pub struct Connection {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
    addr: String,
}

impl Connection {
    /// Connects to `addr` (`host:port`) with `timeout` for connecting and for each read/write.
    pub fn connect(addr: &str, timeout: Duration) -> Result<Self, StoreError> {
        let what = |e: std::io::Error| StoreError::Io {
            what: format!("connecting to redis at {addr} (is redis-server running?)"),
            source: e,
        };
        let sock = addr
            .to_socket_addrs()
            .map_err(what)?
            .next()
            .ok_or_else(|| {
                StoreError::Config(format!("redis address {addr} resolves to nothing"))
            })?;
        let stream = TcpStream::connect_timeout(&sock, timeout).map_err(what)?;
        stream.set_read_timeout(Some(timeout)).map_err(what)?;
        stream.set_write_timeout(Some(timeout)).map_err(what)?;
        stream.set_nodelay(true).map_err(what)?;
        let write_half = stream.try_clone().map_err(what)?;
        Ok(Self {
            reader: BufReader::with_capacity(1 << 16, stream),
            writer: BufWriter::with_capacity(1 << 16, write_half),
            addr: addr.to_owned(),
        })
    }

    fn io(&self, e: std::io::Error) -> StoreError {
        StoreError::Io {
            what: format!("talking to redis at {}", self.addr),
            source: e,
        }
    }

    /// Sends one command and reads its reply.
    pub fn call(&mut self, args: &[&[u8]]) -> Result<Reply, StoreError> {
        let mut replies = self.pipeline(&[args.to_vec()])?;
        replies
            .pop()
            .ok_or_else(|| StoreError::Redis("no reply".into()))
    }

    /// Sends every command, then reads one reply per command, in order.
    pub fn pipeline(&mut self, cmds: &[Vec<&[u8]>]) -> Result<Vec<Reply>, StoreError> {
        for args in cmds {
            self.write_command(args).map_err(|e| self.io(e))?;
        }
        self.writer.flush().map_err(|e| self.io(e))?;
        let mut out = Vec::with_capacity(cmds.len());
        for _ in cmds {
            out.push(self.read_reply(0)?);
        }
        Ok(out)
    }

    fn write_command(&mut self, args: &[&[u8]]) -> std::io::Result<()> {
        write!(self.writer, "*{}\r\n", args.len())?;
        for a in args {
            write!(self.writer, "${}\r\n", a.len())?;
            self.writer.write_all(a)?;
            self.writer.write_all(b"\r\n")?;
        }
        Ok(())
    }

    fn read_line(&mut self) -> Result<String, StoreError> {
        let mut line = Vec::new();
        self.reader
            .read_until(b'\n', &mut line)
            .map_err(|e| self.io(e))?;
        if !line.ends_with(b"\r\n") {
            return Err(StoreError::Redis(format!(
                "connection to {} closed mid-reply",
                self.addr
            )));
        }
        line.truncate(line.len() - 2);
        String::from_utf8(line).map_err(|_| StoreError::Redis("non-UTF-8 reply header".into()))
    }

    fn read_reply(&mut self, depth: usize) -> Result<Reply, StoreError> {
        if depth > 8 {
            return Err(StoreError::Redis("reply nested too deeply".into()));
        }
        let line = self.read_line()?;
        let (tag, rest) = line.split_at(line.len().min(1));
        let num = || {
            rest.parse::<i64>()
                .map_err(|_| StoreError::Redis(format!("bad reply header {line:?}")))
        };
        match tag {
            "+" => Ok(Reply::Simple(rest.to_owned())),
            "-" => Ok(Reply::Error(rest.to_owned())),
            ":" => Ok(Reply::Int(num()?)),
            "$" => {
                let n = num()?;
                if n < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let n = n as usize;
                if n > MAX_BULK {
                    return Err(StoreError::Redis(format!(
                        "bulk reply of {n} bytes is too large"
                    )));
                }
                let mut buf = vec![0u8; n + 2];
                self.reader.read_exact(&mut buf).map_err(|e| self.io(e))?;
                buf.truncate(n);
                Ok(Reply::Bulk(Some(buf)))
            }
            "*" => {
                let n = num()?;
                if n < 0 {
                    return Ok(Reply::Array(None));
                }
                let mut items = Vec::with_capacity((n as usize).min(1 << 16));
                for _ in 0..n {
                    items.push(self.read_reply(depth + 1)?);
                }
                Ok(Reply::Array(Some(items)))
            }
            _ => Err(StoreError::Redis(format!("unknown reply {line:?}"))),
        }
    }
}
