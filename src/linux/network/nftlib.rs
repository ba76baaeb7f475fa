//! libnftables, the library the `nft` command is built on, loaded at run
//! time with `dlopen`.
//!
//! Running a script through the library skips the exec, dynamic loading
//! and start-up of an `nft` process for every change. Debian ships only
//! the versioned `libnftables.so.1` (package `libnftables1`, a dependency
//! of `nftables`) and no development package, so the library is loaded by
//! that name instead of being linked.
//!
//! libnftables is not documented as thread-safe, and version 1.0.6 keeps
//! process-wide state besides the context: the ruleset generation id that
//! decides whether a context's ruleset cache is still valid (`mnl.c`), and
//! the interface cache. [`Context::run`] therefore holds one process-wide
//! lock, even across contexts.
//!
//! NOTE: libnftables 1.0.6 calls `exit` when an allocation fails
//! (`memory_allocation_error` in `utils.c`), which now ends the server
//! where it used to end only an `nft` child.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::NonNull;
use std::sync::{Mutex, OnceLock};

/// File name of the library, as `dlopen` finds it in the linker's paths.
pub const LIBRARY_NAME: &str = "libnftables.so.1";

/// `NFT_CTX_DEFAULT` of `nft_ctx_new`: a context that opens its netlink
/// socket at once.
const NFT_CTX_DEFAULT: u32 = 0;

/// Errors of loading libnftables and of running commands through it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NftLibError {
    #[error("loading {library} failed: {reason}")]
    Load { library: String, reason: String },
    #[error("{library} has no symbol {symbol}: {reason}")]
    Symbol { library: String, symbol: &'static str, reason: String },
    #[error("nftables needs a netfilter netlink socket, and opening one failed: {reason}")]
    Netlink { reason: String },
    #[error("setting close-on-exec on the nftables netlink socket failed: {reason}")]
    Cloexec { reason: String },
    #[error("nft_ctx_new of {library} returned no context")]
    NewContext { library: String },
    #[error("buffering the {stream} of the libnftables context failed")]
    Buffer { stream: &'static str },
    #[error("the nftables commands contain a NUL byte at offset {offset}")]
    NulByte { offset: usize },
    /// Failure of the commands, with nft's own error output as `message`.
    #[error("{message}")]
    Command { message: String },
}

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxBuffer = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxGetBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type RunCmdFromBuffer = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// The functions of a loaded libnftables. The library is never unloaded,
/// because the function pointers are used for the life of the process.
pub struct Library {
    name: String,
    ctx_new: CtxNew,
    ctx_free: CtxFree,
    buffer_output: CtxBuffer,
    buffer_error: CtxBuffer,
    get_output_buffer: CtxGetBuffer,
    get_error_buffer: CtxGetBuffer,
    run_cmd_from_buffer: RunCmdFromBuffer,
}

impl std::fmt::Debug for Library {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Library").field("name", &self.name).finish_non_exhaustive()
    }
}

/// Serialises every call into libnftables, because of its process-wide
/// state.
static RUN_LOCK: Mutex<()> = Mutex::new(());

/// Returns libnftables, loading it on first use. A failed load is kept
/// and returned again.
pub fn library() -> Result<&'static Library, NftLibError> {
    static LIBRARY: OnceLock<Result<&'static Library, NftLibError>> = OnceLock::new();
    LIBRARY
        .get_or_init(|| Library::load(LIBRARY_NAME).map(|library| &*Box::leak(Box::new(library))))
        .clone()
}

impl Library {
    /// Loads the library `name` with `dlopen` and resolves the functions
    /// [`Context`] calls.
    pub fn load(name: &str) -> Result<Library, NftLibError> {
        let load_error = |reason: String| NftLibError::Load { library: name.to_string(), reason };
        let c_name = CString::new(name).map_err(|_| load_error("the name contains a NUL byte".into()))?;

        let _serial = lock_runs();
        // SAFETY: `c_name` is a valid C string. RTLD_LOCAL keeps the
        // library's symbols out of the global namespace.
        let handle = unsafe { libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(load_error(last_dl_error()));
        }

        let symbol = |symbol: &'static str| -> Result<*mut c_void, NftLibError> {
            let c_symbol = CString::new(symbol).expect("symbol names contain no NUL byte");
            // SAFETY: `handle` came from a successful dlopen and is never
            // closed.
            let address = unsafe { libc::dlsym(handle, c_symbol.as_ptr()) };
            if address.is_null() {
                return Err(NftLibError::Symbol { library: name.to_string(), symbol, reason: last_dl_error() });
            }
            Ok(address)
        };

        // SAFETY: each symbol is transmuted to the signature that
        // libnftables(3) declares for it.
        let library = unsafe {
            Library {
                name: name.to_string(),
                ctx_new: std::mem::transmute::<*mut c_void, CtxNew>(symbol("nft_ctx_new")?),
                ctx_free: std::mem::transmute::<*mut c_void, CtxFree>(symbol("nft_ctx_free")?),
                buffer_output: std::mem::transmute::<*mut c_void, CtxBuffer>(symbol("nft_ctx_buffer_output")?),
                buffer_error: std::mem::transmute::<*mut c_void, CtxBuffer>(symbol("nft_ctx_buffer_error")?),
                get_output_buffer: std::mem::transmute::<*mut c_void, CtxGetBuffer>(symbol("nft_ctx_get_output_buffer")?),
                get_error_buffer: std::mem::transmute::<*mut c_void, CtxGetBuffer>(symbol("nft_ctx_get_error_buffer")?),
                run_cmd_from_buffer: std::mem::transmute::<*mut c_void, RunCmdFromBuffer>(symbol("nft_run_cmd_from_buffer")?),
            }
        };
        Ok(library)
    }

    /// Returns the file name the library was loaded by.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Returns and clears the message of the last failed `dlopen` or `dlsym`.
fn last_dl_error() -> String {
    // SAFETY: dlerror returns NULL or a C string valid until the next dl
    // call, and it is copied at once.
    let message = unsafe { libc::dlerror() };
    if message.is_null() {
        return "no error message".into();
    }
    // SAFETY: non-NULL, so a NUL-terminated string, as checked above.
    unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned()
}

fn lock_runs() -> std::sync::MutexGuard<'static, ()> {
    RUN_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Checks that this thread's network namespace can open a netfilter
/// netlink socket. `nft_ctx_new` of libnftables 1.0.6 calls `exit` when
/// it cannot, which would end the server.
fn check_netfilter_socket() -> Result<(), NftLibError> {
    // SAFETY: plain socket and close calls on a descriptor owned here.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_NETFILTER) };
    if fd < 0 {
        return Err(NftLibError::Netlink { reason: std::io::Error::last_os_error().to_string() });
    }
    // SAFETY: `fd` was opened above and is closed once.
    unsafe { libc::close(fd) };
    Ok(())
}

/// Sets close-on-exec on every netfilter netlink socket of the process.
///
/// libnftables 1.0.6 opens its socket without `SOCK_CLOEXEC`, so without
/// this every child the server starts would inherit it. Only libnftables
/// opens sockets of this protocol here (rtnetlink uses `NETLINK_ROUTE`).
/// NOTE: a child started by another thread between `nft_ctx_new` and this
/// call still inherits the socket.
fn close_netfilter_sockets_on_exec() -> Result<(), NftLibError> {
    let failed = |error: std::io::Error| NftLibError::Cloexec { reason: error.to_string() };
    for entry in std::fs::read_dir("/proc/self/fd").map_err(failed)? {
        let Some(fd) = entry.map_err(failed)?.file_name().to_str().and_then(|name| name.parse::<c_int>().ok()) else {
            continue;
        };
        if socket_option(fd, libc::SO_DOMAIN) != Some(libc::AF_NETLINK) || socket_option(fd, libc::SO_PROTOCOL) != Some(libc::NETLINK_NETFILTER) {
            continue;
        }
        // SAFETY: fcntl on a descriptor number; a descriptor closed in the
        // meantime only makes the calls fail.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            return Err(failed(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Returns an integer socket option of `fd`, or `None` when `fd` is no
/// socket.
fn socket_option(fd: c_int, option: c_int) -> Option<c_int> {
    let mut value: c_int = 0;
    let mut length = std::mem::size_of::<c_int>() as libc::socklen_t;
    // SAFETY: `value` and `length` are valid for writes of the sizes given.
    let result = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, option, (&raw mut value).cast(), &mut length) };
    (result == 0).then_some(value)
}

/// One libnftables context with buffered output and error output.
///
/// The context opens its netlink socket when it is created, so it acts in
/// the network namespace of the creating thread for its whole life.
///
/// Between runs the context keeps a ruleset cache. libnftables 1.0.6
/// (`nft_cache_update` in `cache.c`) reads the kernel's ruleset generation
/// id at the start of every run and reloads the cache when the id differs
/// from the cached one, and it drops the cache after a failed run. Every
/// commit, of this process or another, changes the id, so a run never
/// evaluates against a ruleset older than the one it starts on. The id
/// read is 16 bits wide, so only exactly a multiple of 65536 commits
/// between two runs would go unnoticed. The `nft` command has the same
/// window between reading the cache and committing.
pub struct Context {
    library: &'static Library,
    raw: NonNull<c_void>,
}

// SAFETY: one thread at a time uses the context, because `run` takes
// `&mut self` and every call takes RUN_LOCK first. libnftables 1.0.6 has no
// thread-local variables, so the thread that calls does not matter.
unsafe impl Send for Context {}

impl Context {
    /// Creates a context of `library` in the calling thread's network
    /// namespace, with output and error output buffered.
    pub fn new(library: &'static Library) -> Result<Context, NftLibError> {
        check_netfilter_socket()?;
        let raw = {
            let _serial = lock_runs();
            // SAFETY: a function of the loaded library, called as declared.
            unsafe { (library.ctx_new)(NFT_CTX_DEFAULT) }
        };
        let raw = NonNull::new(raw).ok_or_else(|| NftLibError::NewContext { library: library.name.clone() })?;
        let context = Context { library, raw };
        // A failure drops the context, which frees it under RUN_LOCK, so
        // the lock is only held inside `configure`.
        context.configure()?;
        Ok(context)
    }

    /// Buffers the output and error output of a new context and keeps its
    /// socket out of child processes.
    fn configure(&self) -> Result<(), NftLibError> {
        let _serial = lock_runs();
        close_netfilter_sockets_on_exec()?;
        // SAFETY: `raw` is a live context.
        if unsafe { (self.library.buffer_output)(self.raw.as_ptr()) } != 0 {
            return Err(NftLibError::Buffer { stream: "output" });
        }
        // SAFETY: as above.
        if unsafe { (self.library.buffer_error)(self.raw.as_ptr()) } != 0 {
            return Err(NftLibError::Buffer { stream: "error output" });
        }
        Ok(())
    }

    /// Runs `commands` (nft syntax, as `nft -f` reads) as one transaction
    /// and returns what nft printed, such as a listing. A failure carries
    /// nft's error output.
    pub fn run(&mut self, commands: &str) -> Result<String, NftLibError> {
        let commands = c_commands(commands)?;
        let _serial = lock_runs();
        let raw = self.raw.as_ptr();
        // SAFETY: a live context and a NUL-terminated string that outlives
        // the call.
        let status = unsafe { (self.library.run_cmd_from_buffer)(raw, commands.as_ptr()) };
        // Both buffers are read after every run, because reading rewinds
        // them. So text of an earlier run is never returned again.
        // SAFETY: the buffers belong to the live context and are copied
        // before the next call into the library.
        let output = unsafe { copy_buffer((self.library.get_output_buffer)(raw)) };
        // SAFETY: as above.
        let errors = unsafe { copy_buffer((self.library.get_error_buffer)(raw)) };
        if status != 0 {
            return Err(NftLibError::Command { message: failure_message(status, &errors) });
        }
        Ok(output)
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        let _serial = lock_runs();
        // SAFETY: the context is live and freed once.
        unsafe { (self.library.ctx_free)(self.raw.as_ptr()) };
    }
}

/// Converts commands to the C string libnftables reads.
fn c_commands(commands: &str) -> Result<CString, NftLibError> {
    CString::new(commands).map_err(|error| NftLibError::NulByte { offset: error.nul_position() })
}

/// Copies a buffer that libnftables returned.
///
/// # Safety
/// `buffer` is NULL or a NUL-terminated string that stays valid for the
/// duration of the call.
unsafe fn copy_buffer(buffer: *const c_char) -> String {
    if buffer.is_null() {
        return String::new();
    }
    // SAFETY: the caller's contract.
    unsafe { CStr::from_ptr(buffer) }.to_string_lossy().into_owned()
}

/// Formats the error of a failed run from nft's error output.
fn failure_message(status: c_int, errors: &str) -> String {
    let errors = errors.trim();
    if errors.is_empty() {
        format!("nft_run_cmd_from_buffer failed with {status} and printed no error")
    } else {
        errors.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_reports_dlopen_error() {
        let error = Library::load("libtrellis-no-such-library.so.9").unwrap_err();
        let text = error.to_string();
        assert!(text.starts_with("loading libtrellis-no-such-library.so.9 failed: "), "{text}");
        assert!(text.contains("cannot open shared object file"), "{text}");
    }

    #[test]
    fn library_without_symbols_rejected() {
        // libc is loaded in every process and has none of nft's symbols.
        let error = Library::load("libc.so.6").unwrap_err();
        match error {
            NftLibError::Symbol { symbol, .. } => assert_eq!(symbol, "nft_ctx_new"),
            other => panic!("expected a missing symbol, got {other:?}"),
        }
    }

    #[test]
    fn failure_message_keeps_nft_text() {
        let errors = "Error: Could not process rule: No such file or directory\nadd rule ip t c accept\n^^^^^^^^^^^^^^^^^^^^^^\n";
        assert_eq!(failure_message(1, errors), errors.trim());
    }

    #[test]
    fn failure_message_without_text() {
        assert_eq!(failure_message(-1, " \n"), "nft_run_cmd_from_buffer failed with -1 and printed no error");
    }

    #[test]
    fn socket_option_of_socket_and_pipe() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
        assert_eq!(socket_option(fd, libc::SO_DOMAIN), Some(libc::AF_INET));
        assert_eq!(socket_option(fd, libc::SO_PROTOCOL), Some(libc::IPPROTO_UDP));
        let (reader, _writer) = nix::unistd::pipe().unwrap();
        assert_eq!(socket_option(std::os::fd::AsRawFd::as_raw_fd(&reader), libc::SO_DOMAIN), None);
    }

    #[test]
    fn nul_byte_rejected() {
        let error = c_commands("list tables\0list chains").unwrap_err();
        assert!(matches!(error, NftLibError::NulByte { offset: 11 }), "{error:?}");
    }

    #[test]
    fn commands_passed_unchanged() {
        assert_eq!(c_commands("list tables\n").unwrap().as_bytes(), b"list tables\n");
    }
}
