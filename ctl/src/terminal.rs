//! The local side of a process in a VM: the terminal's size, raw mode
//! (restored on every way out), and the signals kilnctl takes instead of
//! dying of them, to pass them on.

use std::io;
use std::os::fd::RawFd;
use std::sync::Mutex;
use std::time::Instant;

/// A terminal's size in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub rows: u16,
    pub cols: u16,
}

impl Size {
    /// What a process gets when kilnctl has no terminal to measure.
    pub const DEFAULT: Self = Self { rows: 24, cols: 80 };
}

/// The size of the terminal on `fd`; None when `fd` is not a terminal or
/// the kernel knows no size (0x0, as a fresh pty has).
pub fn size(fd: RawFd) -> Option<Size> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into `ws`, which outlives the
    // call; a descriptor that is not a terminal is an error return.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some(Size {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// The size of kilnctl's terminal: stdout's (where the process shows),
/// else stdin's, else [`Size::DEFAULT`].
pub fn local_size() -> Size {
    size(libc::STDOUT_FILENO)
        .or_else(|| size(libc::STDIN_FILENO))
        .unwrap_or(Size::DEFAULT)
}

/// The settings raw mode replaced, for the panic hook (release builds
/// abort on panic, so no destructor would run).
static SAVED: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);

/// A terminal in raw mode: every key goes to the process in the VM as
/// typed (Ctrl-C too: the guest's terminal makes it SIGINT), nothing is
/// echoed here. Dropping it (or a panic) puts the old settings back.
#[derive(Debug)]
pub struct RawMode(());

impl RawMode {
    /// Raw mode on `fd`; None when `fd` is not a terminal.
    pub fn enter(fd: RawFd) -> io::Result<Option<Self>> {
        // SAFETY: termios is plain old data; tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes one termios into `saved`; a descriptor
        // that is no terminal is an error return (ENOTTY).
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Ok(None);
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only changes the flags of the termios given.
        unsafe { libc::cfmakeraw(&mut raw) };
        install_panic_hook();
        if let Ok(mut slot) = SAVED.lock() {
            *slot = Some((fd, saved));
        }
        // SAFETY: tcsetattr reads one valid termios; `fd` is a terminal.
        if unsafe { libc::tcsetattr(fd, libc::TCSADRAIN, &raw) } != 0 {
            let e = io::Error::last_os_error();
            restore();
            return Err(e);
        }
        Ok(Some(Self(())))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}

/// Puts back the settings raw mode replaced, once.
fn restore() {
    let saved = SAVED.lock().ok().and_then(|mut slot| slot.take());
    if let Some((fd, termios)) = saved {
        // SAFETY: as in RawMode::enter; the settings are the terminal's own.
        unsafe { libc::tcsetattr(fd, libc::TCSADRAIN, &termios) };
    }
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}

/// Signals kilnctl receives synchronously instead of dying of them: blocked
/// in the thread that blocks them and every thread it starts afterwards,
/// and taken with [`Signals::wait`] by the one thread that forwards them.
#[derive(Debug)]
pub struct Signals {
    set: libc::sigset_t,
}

impl Signals {
    /// Blocks `signals`; call it before starting any thread.
    pub fn block(signals: &[libc::c_int]) -> io::Result<Self> {
        // SAFETY: sigset_t is plain old data; sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t for these calls.
        unsafe {
            libc::sigemptyset(&mut set);
            for &signal in signals {
                libc::sigaddset(&mut set, signal);
            }
        }
        // SAFETY: `set` is initialised; the old mask is not wanted (null).
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(Self { set })
    }

    /// The next of the signals, or None once `deadline` passed.
    pub fn wait(&self, deadline: Option<Instant>) -> Option<libc::c_int> {
        loop {
            let rc = match deadline {
                None => {
                    // SAFETY: `set` is initialised; no siginfo is wanted.
                    unsafe { libc::sigwaitinfo(&self.set, std::ptr::null_mut()) }
                }
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let timeout = libc::timespec {
                        tv_sec: left.as_secs() as libc::time_t,
                        tv_nsec: left.subsec_nanos() as libc::c_long,
                    };
                    // SAFETY: `set` and `timeout` are valid for the call.
                    unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &timeout) }
                }
            };
            if rc > 0 {
                return Some(rc);
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN) => return None,
                // EINTR: a signal outside the set (SIGSTOP/SIGCONT).
                _ => continue,
            }
        }
    }
}

/// Makes a write to a pipe or socket whose reader is gone fail with
/// `EPIPE` in this thread instead of killing kilnctl: main restores
/// SIGPIPE's default (so `kilnctl watch | head` ends quietly), but the
/// threads that feed kilnd (a terminal, an archive) must see the error.
/// SIGPIPE goes to the thread that wrote, so blocking it here is enough.
pub fn no_sigpipe_in_this_thread() {
    let _ = Signals::block(&[libc::SIGPIPE]);
}

/// The signal's name as `kill -l` prints it, for messages.
pub fn signal_name(signal: libc::c_int) -> String {
    match signal {
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGQUIT => "SIGQUIT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGKILL => "SIGKILL".into(),
        other => format!("signal {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_pipe_has_no_size_and_no_raw_mode() {
        let (r, _w) = std::io::pipe().unwrap();
        use std::os::fd::AsRawFd;
        assert_eq!(size(r.as_raw_fd()), None);
        assert!(RawMode::enter(r.as_raw_fd()).unwrap().is_none());
    }

    /// In a thread of its own, so the blocked mask stays there.
    #[test]
    fn signals_are_taken_not_delivered() {
        std::thread::spawn(|| {
            let signals = Signals::block(&[libc::SIGUSR2]).unwrap();
            let started = Instant::now();
            assert_eq!(
                signals.wait(Some(Instant::now() + Duration::from_millis(50))),
                None
            );
            assert!(started.elapsed() >= Duration::from_millis(50));
            // SAFETY: pthread_self names this live thread.
            unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGUSR2) };
            assert_eq!(signals.wait(None), Some(libc::SIGUSR2));
        })
        .join()
        .unwrap();
    }
}
