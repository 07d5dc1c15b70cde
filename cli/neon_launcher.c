/* `neon` as a native program: the launcher of cli/launch.py and cli/warm_client.py for a
 * command that may run in the home's warm command server, without an interpreter's start.
 *
 * The Python launcher spends ~11 ms starting the interpreter and ~2 ms importing before it
 * connects: about a third of a warm `snapshot list` (~34 ms) and a tenth of an incremental
 * push (bench/README.md, "Session 34"). This program does the same exchange (warm_client's
 * module note) and hands the server what only the launcher can know: argv, the environment,
 * umask, niceness, ignored and blocked signals, resource limits, descriptors cwd and 0-2,
 * and the directory a script here would have as sys.path[0]. The server completes it into
 * the Python launcher's request (cli/warm_native.py): the interpreter's own parts (sys.flags,
 * sys.path, the standard streams' encodings) are its own, which it checks are what a Python
 * launcher with this environment would have had.
 *
 * Anything else is the Python launcher's: a command not on the allowlist, NEON_WARM=0, no
 * server, a "cold" answer, a closed descriptor 0-2, a home this program does not resolve
 * (`~user`), any failure before the "go": it execs NEON_PYTHON_LAUNCHER beside it, which
 * decides again and runs the command itself if it must. So this program never runs a
 * command differently from the Python launcher; it only skips the interpreter when the
 * server runs the command anyway.
 *
 * The constants shared with the Python launcher (the allowlist, the socket's name, the
 * forwarded signals, the limits, the default homes) come from neon_launcher_config.h, which
 * cli/native_launcher.py writes from the Python modules when it builds this program.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <locale.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "neon_launcher_config.h"

extern char **environ;

/* ---- a growable buffer and the marshal format (CPython's Python/marshal.c, version 4) ---- */

typedef struct {
    unsigned char *data;
    size_t len, cap;
} Buf;

static int put(Buf *b, const void *p, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n) cap *= 2;
        unsigned char *data = realloc(b->data, cap);
        if (data == NULL) return -1;
        b->data = data;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}

static int put_byte(Buf *b, unsigned char c) { return put(b, &c, 1); }

static int put_u32(Buf *b, uint32_t v) {
    unsigned char le[4] = {v & 0xff, (v >> 8) & 0xff, (v >> 16) & 0xff, (v >> 24) & 0xff};
    return put(b, le, 4);
}

/* TYPE_INT ('i', 32 bits little-endian) or TYPE_LONG ('l': a signed count of 15-bit digits,
 * least significant first). */
static int m_int(Buf *b, long long v) {
    if (v >= INT32_MIN && v <= INT32_MAX) return put_byte(b, 'i') || put_u32(b, (uint32_t)(int32_t)v);
    unsigned long long m = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    uint16_t digits[5];
    int n = 0;
    while (m) {
        digits[n++] = (uint16_t)(m & 0x7fff);
        m >>= 15;
    }
    if (put_byte(b, 'l') || put_u32(b, (uint32_t)(int32_t)(v < 0 ? -n : n))) return -1;
    for (int i = 0; i < n; i++) {
        unsigned char le[2] = {digits[i] & 0xff, digits[i] >> 8};
        if (put(b, le, 2)) return -1;
    }
    return 0;
}

/* TYPE_SHORT_ASCII: the request's keys and names (ASCII, under 256 bytes). */
static int m_name(Buf *b, const char *s) {
    size_t n = strlen(s);
    return put_byte(b, 'z') || put_byte(b, (unsigned char)n) || put(b, s, n);
}

/* TYPE_STRING (bytes): argv, the environment, paths: whatever their encoding. */
static int m_bytes(Buf *b, const char *s, size_t n) {
    return put_byte(b, 's') || put_u32(b, (uint32_t)n) || put(b, s, n);
}

static int m_count(Buf *b, char type, uint32_t n) { return put_byte(b, type) || put_u32(b, n); }

/* One answer of the server: a dict of one name and an int or a str ({"ready": 1},
 * {"pid": N}, {"status": N}, {"cold": why}). */
typedef struct {
    char name[16];
    int has_int;
    long long value;
} Answer;

static int get_u32(const unsigned char *p, const unsigned char *end, uint32_t *v) {
    if (end - p < 4) return -1;
    *v = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    return 0;
}

/* The string at *p (its marshal type taken), into out (NUL-terminated, cut to size). */
static int get_str(const unsigned char **p, const unsigned char *end, int type, char *out, size_t size) {
    uint32_t n;
    if (type == 'z' || type == 'Z') {
        if (*p >= end) return -1;
        n = *(*p)++;
    } else if (type == 'a' || type == 'A' || type == 'u' || type == 't') {
        if (get_u32(*p, end, &n)) return -1;
        *p += 4;
    } else {
        return -1;
    }
    if ((size_t)(end - *p) < n) return -1;
    if (out != NULL) {
        size_t k = n < size - 1 ? n : size - 1;
        memcpy(out, *p, k);
        out[k] = 0;
    }
    *p += n;
    return 0;
}

static int parse_answer(const unsigned char *p, size_t len, Answer *a) {
    const unsigned char *end = p + len;
    memset(a, 0, sizeof *a);
    if (p >= end || (*p++ & 0x7f) != '{' || p >= end) return -1;
    if (get_str(&p, end, *p++ & 0x7f, a->name, sizeof a->name)) return -1;
    if (p >= end) return -1;
    int type = *p++ & 0x7f;
    if (type == 'i') {
        uint32_t v;
        if (get_u32(p, end, &v)) return -1;
        a->has_int = 1;
        a->value = (int32_t)v;
    } else if (get_str(&p, end, type, NULL, 0)) {
        return -1;
    }
    return 0;
}

/* ---- the exchange ---- */

static int send_all(int sock, const unsigned char *p, size_t n, const int *fds, int nfds) {
    while (n) {
        struct iovec iov = {(void *)p, n};
        struct msghdr msg = {0};
        union {
            char buf[CMSG_SPACE(4 * sizeof(int))];
            struct cmsghdr align;
        } control;
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        if (nfds) {
            memset(&control, 0, sizeof control);
            msg.msg_control = control.buf;
            msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
            struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
            memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
        }
        ssize_t sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += sent;
        n -= (size_t)sent;
        nfds = 0; /* attached to the first bytes only */
    }
    return 0;
}

static int send_message(int sock, Buf *body, const int *fds, int nfds) {
    Buf frame = {0};
    uint32_t n = (uint32_t)body->len;
    unsigned char be[4] = {n >> 24, (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff};
    int failed = put(&frame, be, 4) || put(&frame, body->data, body->len) ||
                 send_all(sock, frame.data, frame.len, fds, nfds);
    free(frame.data);
    return failed ? -1 : 0;
}

static const char *failure = "";
/* Why the last exchange failed, for the "went away" message. */

static int receive_exactly(int sock, unsigned char *p, size_t n) {
    while (n) {
        ssize_t got = recv(sock, p, n, 0);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
            failure = got == 0 ? "the connection closed" : strerror(errno);
            return -1;
        }
        p += got;
        n -= (size_t)got;
    }
    return 0;
}

static int receive_answer(int sock, Answer *a) {
    unsigned char be[4];
    if (receive_exactly(sock, be, 4)) return -1;
    uint32_t n = (uint32_t)be[0] << 24 | (uint32_t)be[1] << 16 | (uint32_t)be[2] << 8 | be[3];
    if (n > NEON_REQUEST_MAX) {
        failure = "a message too large";
        return -1;
    }
    unsigned char *body = malloc(n ? n : 1);
    if (body == NULL) {
        failure = "out of memory";
        return -1;
    }
    int failed = receive_exactly(sock, body, n);
    if (!failed && parse_answer(body, n, a)) {
        failed = 1;
        failure = "a bad warm server message";
    }
    free(body);
    return failed ? -1 : 0;
}

/* ---- the request ---- */

static int env_seen_before(char **entry, size_t keylen) {
    for (char **e = environ; e < entry; e++)
        if (strncmp(*e, *entry, keylen + 1) == 0) return 1;
    return 0;
}

/* The environment as os.environb has it: entries without '=' left out, the first of a
 * name kept. */
static int m_environ(Buf *b) {
    if (put_byte(b, '{')) return -1;
    for (char **e = environ; *e; e++) {
        const char *eq = strchr(*e, '=');
        if (eq == NULL || eq == *e || env_seen_before(e, (size_t)(eq - *e))) continue;
        if (m_bytes(b, *e, (size_t)(eq - *e)) || m_bytes(b, eq + 1, strlen(eq + 1))) return -1;
    }
    return put_byte(b, '0');
}

static int ignored_signal(int sig) {
    struct sigaction sa;
    return sigaction(sig, NULL, &sa) == 0 && !(sa.sa_flags & SA_SIGINFO) && sa.sa_handler == SIG_IGN;
}

static int m_signals(Buf *b, const sigset_t *set, int ignored) {
    int n = 0, list[NSIG];
    sigset_t valid;
    sigfillset(&valid); /* signal.valid_signals(): the C library's own two left out */
    for (int sig = 1; sig < NSIG; sig++) {
        if (!sigismember(&valid, sig)) continue;
        if (ignored ? ignored_signal(sig) : sigismember(set, sig) == 1) list[n++] = sig;
    }
    if (m_count(b, '[', (uint32_t)n)) return -1;
    for (int i = 0; i < n; i++)
        if (m_int(b, list[i])) return -1;
    return 0;
}

static long long rlim_value(rlim_t v) { return v == RLIM_INFINITY ? -1 : (long long)v; }

static int m_limits(Buf *b) {
    if (put_byte(b, '{')) return -1;
    for (size_t i = 0; i < sizeof NEON_LIMITS / sizeof NEON_LIMITS[0]; i++) {
        struct rlimit rl;
        if (getrlimit(NEON_LIMITS[i].resource, &rl)) return -1;
        if (m_name(b, NEON_LIMITS[i].name) || m_count(b, '(', 2) ||
            m_int(b, rlim_value(rl.rlim_cur)) || m_int(b, rlim_value(rl.rlim_max)))
            return -1;
    }
    return put_byte(b, '0');
}

static int build_request(Buf *b, int argc, char **argv, const char *argv0, const char *path0) {
    mode_t mask = umask(077);
    umask(mask);
    errno = 0;
    int nice = getpriority(PRIO_PROCESS, 0);
    if (nice == -1 && errno) return -1;
    sigset_t blocked;
    if (sigprocmask(SIG_BLOCK, NULL, &blocked)) return -1;
    if (put_byte(b, '{') || m_name(b, "native") || m_int(b, 1) || m_name(b, "argv") ||
        m_count(b, '[', (uint32_t)argc) || m_bytes(b, argv0, strlen(argv0)))
        return -1;
    for (int i = 1; i < argc; i++)
        if (m_bytes(b, argv[i], strlen(argv[i]))) return -1;
    return m_name(b, "path0") || m_bytes(b, path0, strlen(path0)) || m_name(b, "executable") ||
           m_bytes(b, NEON_EXECUTABLE, strlen(NEON_EXECUTABLE)) || m_name(b, "env") ||
           m_environ(b) || m_name(b, "umask") || m_int(b, mask) || m_name(b, "nice") ||
           m_int(b, nice) || m_name(b, "ignored") || m_signals(b, NULL, 1) ||
           m_name(b, "limits") || m_limits(b) || m_name(b, "blocked") ||
           m_signals(b, &blocked, 0) || put_byte(b, '0');
}

/* ---- which command, which home ---- */

/* cli.launch.command_of: the --home option and the index of the command's first word, or
 * -1 where an option the launcher does not know comes first. */
static int command_of(int argc, char **argv, const char **home) {
    int i = 1;
    *home = NULL;
    while (i < argc && argv[i][0] == '-') {
        const char *arg = argv[i];
        if (strcmp(arg, "--home") == 0 || strcmp(arg, "--pageserver") == 0) {
            if (i + 1 >= argc) return -1;
            if (strcmp(arg, "--home") == 0) *home = argv[i + 1];
            i += 2;
        } else if (strncmp(arg, "--home=", 7) == 0) {
            *home = arg + 7;
            i++;
        } else if (strncmp(arg, "--pageserver=", 13) == 0) {
            i++;
        } else {
            return -1;
        }
    }
    return i;
}

static int warm_command(int argc, char **argv, int at) {
    if (at < 0 || at + 1 >= argc) return 0;
    for (size_t i = 0; NEON_WARM_COMMANDS[i][0] != NULL; i++)
        if (strcmp(argv[at], NEON_WARM_COMMANDS[i][0]) == 0 &&
            strcmp(argv[at + 1], NEON_WARM_COMMANDS[i][1]) == 0)
            return 1;
    return 0;
}

/* cli.home_root.chosen_home, with `~` and `~/` expanded from $HOME as os.path.expanduser
 * does; 0 where the Python launcher must decide (`~user`, no $HOME, too long). A relative
 * home stays relative: connect() resolves it from the same working directory. */
static int socket_path(const char *home, char *out, size_t size) {
    if (home == NULL) {
        const char *env = getenv(NEON_HOME_ENV);
        home = env != NULL && *env ? env : geteuid() == 0 ? NEON_ROOT_HOME : NEON_USER_HOME;
    }
    if (home[0] == 0) return 0; /* abspath(""): the working directory */
    const char *rest = home, *prefix = "";
    if (home[0] == '~') {
        if (home[1] != 0 && home[1] != '/') return 0;
        prefix = getenv("HOME");
        if (prefix == NULL) return 0;
        rest = home + 1;
        size_t n = strlen(prefix);
        while (n > 1 && prefix[n - 1] == '/') n--; /* expanduser strips the trailing one */
        int wrote = snprintf(out, size, "%.*s%s/pageserver/%s", (int)n, prefix,
                             *rest ? rest : "", NEON_SOCKET_NAME);
        return wrote > 0 && (size_t)wrote < size;
    }
    int wrote = snprintf(out, size, "%s/pageserver/%s", rest, NEON_SOCKET_NAME);
    return wrote > 0 && (size_t)wrote < size;
}

/* ---- signals: warm_client._Forwarder ---- */

static volatile sig_atomic_t child_pid = 0;
static volatile sig_atomic_t pending[NSIG];
static int group;             /* this process's group is its terminal's foreground group */
static struct sigaction previous[NSIG];
static int installed[NSIG];

/* warm_client.GROUP_SIGNALS */
static int group_signal(int sig) {
    for (size_t i = 0; i < sizeof NEON_GROUP_SIGNALS / sizeof NEON_GROUP_SIGNALS[0]; i++)
        if (NEON_GROUP_SIGNALS[i] == sig) return 1;
    return 0;
}

static void send_signal(pid_t pid, int sig) {
    int saved = errno;
    if (group && group_signal(sig) && (killpg(pid, sig) == 0 || errno != ESRCH)) {
        errno = saved;
        return;
    }
    kill(pid, sig);
    errno = saved;
}

static void forward(int sig) {
    pid_t pid = child_pid;
    if (pid)
        send_signal(pid, sig);
    else
        pending[sig]++;
}

static void job_control(int sig) {
    pid_t pid = child_pid;
    if (sig == SIGTSTP) {
        if (pid) send_signal(pid, SIGSTOP);
        kill(getpid(), SIGSTOP);
    } else if (pid) {
        send_signal(pid, SIGCONT);
    }
}

static int in_foreground(void) {
    for (int fd = 0; fd < 3; fd++) {
        pid_t pgrp = tcgetpgrp(fd);
        if (pgrp != -1) return pgrp == getpgrp();
    }
    return 0;
}

static void install(int sig, void (*handler)(int)) {
    struct sigaction sa;
    if (sigaction(sig, NULL, &sa) || (!(sa.sa_flags & SA_SIGINFO) && sa.sa_handler == SIG_IGN))
        return; /* ignored: by the child too */
    previous[sig] = sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(sig, &sa, NULL) == 0) installed[sig] = 1;
}

static void install_forwarder(void) {
    group = in_foreground();
    for (size_t i = 0; i < sizeof NEON_FORWARDED_SIGNALS / sizeof NEON_FORWARDED_SIGNALS[0]; i++)
        install(NEON_FORWARDED_SIGNALS[i], forward);
    install(SIGTSTP, job_control);
    install(SIGCONT, job_control);
}

/* As if the handlers had never been installed: what came meanwhile is raised here. */
static void restore_forwarder(void) {
    for (int sig = 1; sig < NSIG; sig++)
        if (installed[sig]) {
            sigaction(sig, &previous[sig], NULL);
            installed[sig] = 0;
        }
    for (int sig = 1; sig < NSIG; sig++)
        for (; pending[sig] > 0; pending[sig]--) kill(getpid(), sig);
}

static void started(pid_t pid) {
    sigset_t all, old;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &old);
    child_pid = pid;
    for (int sig = 1; sig < NSIG; sig++)
        for (; pending[sig] > 0; pending[sig]--) send_signal(pid, sig);
    sigprocmask(SIG_SETMASK, &old, NULL);
}

/* The child's status came: nothing more goes to its pid (reaped, perhaps reused). */
static void ended(void) {
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, NULL);
    child_pid = 0;
}

/* ---- the run ---- */

static char fallback[PATH_MAX];

/* The Python launcher beside this program, with this process's arguments. */
static void run_python_launcher(int argc, char **argv) {
    char **args = calloc((size_t)argc + 1, sizeof *args);
    if (args != NULL) {
        args[0] = fallback;
        for (int i = 1; i < argc; i++) args[i] = argv[i];
        execv(fallback, args);
    }
    fprintf(stderr, "neon: error: cannot run %s: %s\n", fallback, strerror(errno));
    exit(1);
}

static void exit_as(int status) {
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        struct rlimit core;
        /* the child dumped its core if it could: not this process too */
        if (getrlimit(RLIMIT_CORE, &core) == 0) {
            core.rlim_cur = 0;
            setrlimit(RLIMIT_CORE, &core);
        }
        signal(sig, SIG_DFL);
        sigset_t one;
        sigemptyset(&one);
        sigaddset(&one, sig);
        sigprocmask(SIG_UNBLOCK, &one, NULL);
        kill(getpid(), sig);
        _exit(128 + sig); /* a signal whose default is not to end the process */
    }
    _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 1);
}

static void went_away(const char *why) {
    fprintf(stderr,
            "neon: error: the warm command server went away (%s); the command has ended,"
            " with a status nobody kept\n",
            why);
    _exit(1);
}

/* The connected, accepted request (the server forks on our "go"), or -1: the Python
 * launcher's (warm_client._handshake). */
static int handshake(const char *path, int argc, char **argv, const char *argv0, const char *path0,
                     int *asked) {
    for (int fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) == -1) return -1; /* the interpreter would have no such stream */
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) return -1;
    strcpy(addr.sun_path, path);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0) return -1;
    struct timeval timeout = {NEON_HANDSHAKE_USEC / 1000000, NEON_HANDSHAKE_USEC % 1000000};
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    struct ucred peer;
    socklen_t peer_len = sizeof peer;
    Buf request = {0}, go = {0};
    Answer answer = {{0}, 0, 0};
    int cwd = -1, ok = 0;
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) == 0 &&
        getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &peer, &peer_len) == 0 &&
        peer.uid == geteuid() &&
        (cwd = open(".", O_RDONLY | O_DIRECTORY | O_CLOEXEC)) >= 0 &&
        build_request(&request, argc, argv, argv0, path0) == 0) {
        int fds[4] = {cwd, 0, 1, 2};
        *asked = send_message(sock, &request, fds, 4) == 0;
        ok = *asked && receive_answer(sock, &answer) == 0 && strcmp(answer.name, "ready") == 0;
        if (!ok && *asked && strcmp(answer.name, "cold") == 0)
            *asked = 0; /* a cold answer: the Python launcher may be served (warm_native.py) */
    }
    if (cwd >= 0) close(cwd);
    free(request.data);
    if (ok) {
        install_forwarder();
        ok = put_byte(&go, '{') == 0 && m_name(&go, "go") == 0 && m_int(&go, 1) == 0 &&
             put_byte(&go, '0') == 0 && send_message(sock, &go, NULL, 0) == 0;
        free(go.data);
        if (!ok) restore_forwarder();
    }
    if (!ok) {
        close(sock);
        return -1;
    }
    return sock;
}

/* Wait for the child's status and exit the same way (warm_client._finish); returns if the
 * server could not fork (nothing ran). */
static void finish(int sock) {
    struct timeval none = {0, 0};
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof none);
    Answer answer;
    if (receive_answer(sock, &answer)) went_away(failure);
    if (strcmp(answer.name, "cold") == 0) {
        close(sock);
        return;
    }
    if (strcmp(answer.name, "status") != 0) { /* the child's own report may come first */
        if (strcmp(answer.name, "pid") != 0 || !answer.has_int || answer.value <= 0)
            went_away("an unexpected answer");
        started((pid_t)answer.value);
        if (receive_answer(sock, &answer)) went_away(failure);
    }
    if (strcmp(answer.name, "status") != 0 || !answer.has_int) went_away("an unexpected answer");
    ended();
    exit_as((int)answer.value);
}

/* Whether CPython would coerce the locale (PEP 538) or turn UTF-8 mode on (PEP 540): its
 * LC_CTYPE is "C" or "POSIX" and LC_ALL is not set. It then adds LC_CTYPE to its environment
 * and the server answers cold: the Python launcher asks itself. */
static int legacy_locale(void) {
    const char *all = getenv("LC_ALL");
    if (all != NULL && *all) return 0;
    const char *ctype = setlocale(LC_CTYPE, "");
    return ctype == NULL || strcmp(ctype, "C") == 0 || strcmp(ctype, "POSIX") == 0;
}

/* This program's directory (sys.path[0] of a script here) and the Python launcher's path. */
static void find_directory(char *path0, size_t size) {
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe);
    char *slash = n > 0 && (size_t)n < sizeof exe ? memrchr(exe, '/', (size_t)n) : NULL;
    if (slash != NULL && slash > exe)
        snprintf(path0, size, "%.*s", (int)(slash - exe), exe);
    else /* no /proc, or a path too long: where it was built */
        snprintf(path0, size, "%s", NEON_BIN_DIR);
    int wrote = snprintf(fallback, sizeof fallback, "%s/%s", path0, NEON_PYTHON_LAUNCHER);
    if (wrote < 0 || (size_t)wrote >= sizeof fallback) {
        fprintf(stderr, "neon: error: this program's directory is too long: %s\n", path0);
        exit(1);
    }
}

int main(int argc, char **argv) {
    char path0[PATH_MAX], path[PATH_MAX];
    find_directory(path0, sizeof path0);
    const char *warm = getenv(NEON_WARM_ENV);
    const char *home;
    int at = command_of(argc, argv, &home);
    if ((warm == NULL || strcmp(warm, "0") != 0) && warm_command(argc, argv, at) &&
        socket_path(home, path, sizeof path) && !legacy_locale()) {
        const char *argv0 = (const char *)getauxval(AT_EXECFN);
        int asked = 0;
        int sock = handshake(path, argc, argv, argv0 != NULL ? argv0 : argv[0], path0, &asked);
        if (sock >= 0) {
            finish(sock); /* returns only if the server could not fork */
            restore_forwarder();
        } else if (asked) {
            /* the server took the request and did not answer in time, or broke off: the
             * Python launcher need not ask again (another HANDSHAKE_TIMEOUT) */
            setenv(NEON_TRIED_ENV, "1", 1);
        }
    }
    run_python_launcher(argc, argv);
    return 1;
}
