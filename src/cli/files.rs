//! `trellis stream-in` and `trellis stream-out`: copy files into and out
//! of a container as tar archives, with a progress line on stderr.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};

use super::client::{connect, TargetArgs};
use super::output;
use crate::client::ClientError;

/// Pipe size between the tar packer or unpacker and the HTTP body.
const PIPE_BYTES: usize = 256 * 1024;

/// When the progress line is shown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// Only when stderr is a terminal.
    #[default]
    Auto,
    /// Always; without a terminal, one line per second.
    Always,
    /// Never.
    Never,
}

/// Options of `trellis stream-in`.
#[derive(Debug, clap::Args)]
pub struct StreamInArgs {
    /// Handle of the container.
    pub handle: String,
    /// Local file or directory to copy in, or `-` to read a tar archive
    /// from stdin. A directory's contents land in DESTINATION.
    pub source: String,
    /// Directory in the container to extract into; the server creates it
    /// when missing.
    pub destination: String,
    /// Send SOURCE, a tar archive file, as it is instead of packing it.
    #[arg(long)]
    pub tar: bool,
    /// User in the container that owns the extracted files (default root).
    #[arg(long)]
    pub user: Option<String>,
    /// Show bytes sent and the rate on stderr: auto (when stderr is a
    /// terminal), always or never.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    #[command(flatten)]
    pub target: TargetArgs,
}

/// Options of `trellis stream-out`.
#[derive(Debug, clap::Args)]
pub struct StreamOutArgs {
    /// Handle of the container.
    pub handle: String,
    /// Path in the container. With a trailing `/` the archive contains the
    /// directory's contents, otherwise the directory or file itself.
    pub source: String,
    /// Local directory to extract into (created when missing), or `-` to
    /// write the tar archive to stdout.
    pub destination: String,
    /// Write the tar archive to the file DESTINATION instead of extracting it.
    #[arg(long)]
    pub tar: bool,
    /// User in the container that reads the files (default root).
    #[arg(long)]
    pub user: Option<String>,
    /// Show bytes received and the rate on stderr: auto (when stderr is a
    /// terminal), always or never.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    #[command(flatten)]
    pub target: TargetArgs,
}

/// A failed stream in or out.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("the tar archive from the server is invalid: {source}")]
    Unpack { source: std::io::Error },
}

/// Counts the bytes read through it.
struct Counting<R> {
    inner: R,
    bytes: Arc<AtomicU64>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counting<R> {
    fn poll_read(mut self: Pin<&mut Self>, context: &mut Context<'_>, buffer: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buffer.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(context, buffer);
        let read = buffer.filled().len() - before;
        self.bytes.fetch_add(read as u64, Ordering::Relaxed);
        result
    }
}

/// Prints the progress of a transfer until dropped, then a final line
/// when the transfer succeeded ([`Progress::finish`]).
struct Progress {
    bytes: Arc<AtomicU64>,
    started: Instant,
    verb: &'static str,
    enabled: bool,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    fn start(mode: ProgressMode, verb: &'static str) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        let enabled = match mode {
            ProgressMode::Auto => terminal,
            ProgressMode::Always => true,
            ProgressMode::Never => false,
        };
        let bytes = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let task = enabled.then(|| {
            let bytes = bytes.clone();
            // A terminal line is redrawn in place; other outputs get one
            // line per second so a log stays readable.
            let period = if terminal { Duration::from_millis(250) } else { Duration::from_secs(1) };
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                loop {
                    ticks.tick().await;
                    let line = progress_line(verb, bytes.load(Ordering::Relaxed), started.elapsed());
                    if terminal {
                        eprint!("\r\x1b[K{line}");
                    } else {
                        eprintln!("{line}");
                    }
                }
            })
        });
        Progress { bytes, started, verb, enabled, task }
    }

    fn finish(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if self.enabled {
            let line = progress_line(self.verb, self.bytes.load(Ordering::Relaxed), self.started.elapsed());
            if std::io::stderr().is_terminal() {
                eprintln!("\r\x1b[K{line}");
            } else {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            if std::io::stderr().is_terminal() {
                eprintln!();
            }
        }
    }
}

/// Formats `sent 17.0 MiB (16777216 bytes) in 1.2 s, 14.2 MiB/s`.
fn progress_line(verb: &str, bytes: u64, elapsed: Duration) -> String {
    let seconds = elapsed.as_secs_f64();
    let rate = if seconds > 0.0 { (bytes as f64 / seconds) as u64 } else { 0 };
    format!("{verb} {} ({bytes} bytes) in {seconds:.1} s, {}/s", output::bytes(bytes), output::bytes(rate))
}

/// Runs `trellis stream-in`.
pub async fn stream_in(args: StreamInArgs) -> Result<(), FilesError> {
    let client = connect(&args.target)?;
    let user = args.user.clone().unwrap_or_default();
    let progress = Progress::start(args.progress, "sent");
    let bytes = progress.bytes.clone();

    if args.source == "-" {
        let mut body = Counting { inner: tokio::io::stdin(), bytes };
        client.stream_in(&args.handle, &args.destination, &user, &mut body).await?;
    } else if args.tar {
        let path = PathBuf::from(&args.source);
        let file = tokio::fs::File::open(&path).await.map_err(|source| FilesError::Read { path, source })?;
        let mut body = Counting { inner: file, bytes };
        client.stream_in(&args.handle, &args.destination, &user, &mut body).await?;
    } else {
        let source = PathBuf::from(&args.source);
        let metadata = tokio::fs::metadata(&source).await.map_err(|error| FilesError::Read { path: source.clone(), source: error })?;
        let (writer, reader) = tokio::io::duplex(PIPE_BYTES);
        let pack = pack(source.clone(), metadata.is_dir(), writer);
        let (client, handle, destination, user) = (&client, &args.handle, &args.destination, &user);
        let upload = async move {
            let mut body = Counting { inner: reader, bytes };
            let uploaded = client.stream_in(handle, destination, user, &mut body).await;
            // Dropping the reader ends the packing with a broken pipe when
            // the upload stopped early, as when the server went away.
            // Without it, packing would wait for a reader forever.
            drop(body);
            uploaded
        };
        let (packed, uploaded) = tokio::join!(pack, upload);
        // A server error explains more than the broken pipe it causes.
        uploaded?;
        packed.map_err(|error| FilesError::Read { path: source, source: error })?;
    }
    progress.finish();
    Ok(())
}

/// Writes a tar archive of `source` to `writer`: a directory's contents,
/// or one file under its own name. Symbolic links are archived as links.
async fn pack(source: PathBuf, is_dir: bool, writer: tokio::io::DuplexStream) -> std::io::Result<()> {
    let mut builder = tokio_tar::Builder::new(writer);
    builder.follow_symlinks(false);
    if is_dir {
        builder.append_dir_all(".", &source).await?;
    } else {
        let name = source.file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("file"));
        builder.append_path_with_name(&source, name).await?;
    }
    let mut writer = builder.into_inner().await?;
    writer.shutdown().await
}

/// Runs `trellis stream-out`.
pub async fn stream_out(args: StreamOutArgs) -> Result<(), FilesError> {
    let client = connect(&args.target)?;
    let user = args.user.clone().unwrap_or_default();
    let archive = client.stream_out(&args.handle, &args.source, &user).await?;
    let progress = Progress::start(args.progress, "received");
    let mut body = Counting { inner: archive, bytes: progress.bytes.clone() };

    if args.destination == "-" {
        let mut stdout = tokio::io::stdout();
        tokio::io::copy(&mut body, &mut stdout).await.map_err(|source| FilesError::Write { path: "stdout".into(), source })?;
        stdout.flush().await.map_err(|source| FilesError::Write { path: "stdout".into(), source })?;
    } else if args.tar {
        let path = PathBuf::from(&args.destination);
        let mut file = tokio::fs::File::create(&path).await.map_err(|source| FilesError::Write { path: path.clone(), source })?;
        tokio::io::copy(&mut body, &mut file).await.map_err(|source| FilesError::Write { path: path.clone(), source })?;
        file.flush().await.map_err(|source| FilesError::Write { path, source })?;
    } else {
        let path = PathBuf::from(&args.destination);
        tokio::fs::create_dir_all(&path).await.map_err(|source| FilesError::Write { path: path.clone(), source })?;
        unpack(body, &path).await?;
    }
    progress.finish();
    Ok(())
}

/// Extracts the archive into `destination`. Entries that would land
/// outside it (absolute paths, `..`, links pointing out) are rejected by
/// the tar library.
async fn unpack<R: AsyncRead + Unpin + Send>(body: R, destination: &Path) -> Result<(), FilesError> {
    let mut archive = tokio_tar::ArchiveBuilder::new(body)
        .set_allow_external_symlinks(false)
        .set_preserve_permissions(true)
        .build();
    archive.unpack(destination).await.map_err(|source| FilesError::Unpack { source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_reports_bytes_and_rate() {
        let line = progress_line("sent", 3 << 20, Duration::from_secs(2));
        assert_eq!(line, "sent 3.0 MiB (3145728 bytes) in 2.0 s, 1.5 MiB/s");
    }

    #[tokio::test]
    async fn packed_directory_unpacks_the_same() {
        let source = tempfile::tempdir().unwrap();
        std::fs::create_dir(source.path().join("sub")).unwrap();
        std::fs::write(source.path().join("sub/a.txt"), b"alpha").unwrap();
        std::fs::write(source.path().join("b.bin"), vec![7u8; 300_000]).unwrap();
        std::os::unix::fs::symlink("sub/a.txt", source.path().join("link")).unwrap();

        let (writer, reader) = tokio::io::duplex(PIPE_BYTES);
        let destination = tempfile::tempdir().unwrap();
        let bytes = Arc::new(AtomicU64::new(0));
        let counting = Counting { inner: reader, bytes: bytes.clone() };
        let (packed, unpacked) = tokio::join!(pack(source.path().to_path_buf(), true, writer), unpack(counting, destination.path()));
        packed.unwrap();
        unpacked.unwrap();

        assert_eq!(std::fs::read(destination.path().join("sub/a.txt")).unwrap(), b"alpha");
        assert_eq!(std::fs::read(destination.path().join("b.bin")).unwrap().len(), 300_000);
        assert_eq!(std::fs::read_link(destination.path().join("link")).unwrap(), Path::new("sub/a.txt"));
        assert!(bytes.load(Ordering::Relaxed) > 300_000);
    }
}
