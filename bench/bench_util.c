/* bench_util.c - see bench_util.h.
 * SPDX-License-Identifier: MIT
 */
#include "bench/bench_util.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/cm_mem.h"
#include "common/cm_status.h"
#include "common/cm_time.h"

int bu_cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double bu_median(const double *v, int n) {
    if (n <= 0) return 0.0;
    double *s = cm_malloc((size_t)n * sizeof *s);
    memcpy(s, v, (size_t)n * sizeof *v);
    qsort(s, (size_t)n, sizeof *s, bu_cmp_double);
    double m = n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
    free(s);
    return m;
}

double bu_quantile(const double *v, int n, double q) {
    if (n <= 0) return 0.0;
    double *s = cm_malloc((size_t)n * sizeof *s);
    memcpy(s, v, (size_t)n * sizeof *v);
    qsort(s, (size_t)n, sizeof *s, bu_cmp_double);
    double r = ceil(q * n);
    int k = r < 1.0 ? 0 : r > n ? n - 1 : (int)r - 1;
    double x = s[k];
    free(s);
    return x;
}

int bu_reap_by(pid_t *pid, int *status, double until) {
    for (;;) {
        if (*pid <= 0) return 1;
        pid_t r = waitpid(*pid, status, WNOHANG);
        if (r == *pid || (r < 0 && errno != EINTR)) {
            *pid = 0;
            return 1;
        }
        if (cm_now() >= until) return 0;
        usleep(1000);
    }
}

int bu_free_ports(int *ports, int n) {
    int *fds = cm_malloc((size_t)(n > 0 ? n : 1) * sizeof *fds), nfds = 0, rc = CM_OK;
    for (; nfds < n; nfds++) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t alen = sizeof a;
        fds[nfds] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fds[nfds] < 0) {
            rc = CM_EIO;
            break;
        }
        if (bind(fds[nfds], (struct sockaddr *)&a, sizeof a) ||
            getsockname(fds[nfds], (struct sockaddr *)&a, &alen)) {
            rc = CM_EIO;
            nfds++;
            break;
        }
        ports[nfds] = ntohs(a.sin_port);
    }
    for (int i = 0; i < nfds; i++) close(fds[i]);
    free(fds);
    return rc;
}

int bu_port_accepts(int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return 0;
    int ok = connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
    close(fd);
    return ok;
}

void bu_catch_signals(void (*fn)(int)) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

volatile sig_atomic_t bu_got_signal;

void bu_on_signal(int sig) { bu_got_signal = sig; }

/* ================================================== sockets and lines */

int bu_send_all(int fd, const void *p, size_t n, int flags) {
    const char *c = p;
    while (n > 0) {
        ssize_t k = send(fd, c, n, flags | MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        c += k;
        n -= (size_t)k;
    }
    return 0;
}

int bu_recv_all(int fd, void *p, size_t n) {
    char *c = p;
    while (n > 0) {
        ssize_t k = recv(fd, c, n, MSG_WAITALL);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        c += k;
        n -= (size_t)k;
    }
    return 0;
}

int bu_tcp_connect(int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    for (int attempt = 0; attempt < 100; attempt++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) return -1;
        if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0) {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            return fd;
        }
        close(fd);
        usleep(20000);
    }
    return -1;
}

int bu_parse_calls(const char *prog, const char *arg, int *unary) {
    if (strcmp(arg, "stream") && strcmp(arg, "unary")) {
        fprintf(stderr, "%s: --calls: stream or unary, not '%s'\n", prog, arg);
        return -1;
    }
    *unary = !strcmp(arg, "unary");
    return 0;
}

int bu_read_command(const char *want) {
    char line[64];
    if (!fgets(line, sizeof line, stdin)) return -1;
    line[strcspn(line, "\n")] = 0;
    return strcmp(line, want) ? -1 : 0;
}

int bu_split_list(const char *csv, char **copy, char **out, int max) {
    *copy = cm_strdup(csv);
    int n = 0;
    char *save = NULL;
    for (char *t = strtok_r(*copy, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        if (n == max) return -1;
        out[n++] = t;
    }
    return n;
}

/* One connection of bu_tcp_serve and its thread. */
typedef struct bu_conn {
    void (*serve)(void *ctx, int fd, int listen_fd);
    void *ctx;
    int fd, listen_fd;
    pthread_t th;
} bu_conn;

static void *conn_run(void *arg) {
    bu_conn *c = arg;
    c->serve(c->ctx, c->fd, c->listen_fd);
    return NULL;
}

int bu_tcp_serve(const char *who, void (*serve)(void *ctx, int fd, int listen_fd), void *ctx) {
    bu_conn conns[BU_MAX_CONNS];
    int nconns = 0, listen_fd;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    if ((listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0 ||
        bind(listen_fd, (struct sockaddr *)&a, sizeof a) || listen(listen_fd, 64) ||
        getsockname(listen_fd, (struct sockaddr *)&a, &alen)) {
        perror(who);
        if (listen_fd >= 0) close(listen_fd);
        return 1;
    }
    printf("{\"port\":%d}\n", ntohs(a.sin_port));
    fflush(stdout);
    while (nconns < BU_MAX_CONNS) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0 && errno == EINTR) continue;
        if (fd < 0) break; /* Shut down by a connection. */
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        bu_conn *c = &conns[nconns];
        *c = (bu_conn){.serve = serve, .ctx = ctx, .fd = fd, .listen_fd = listen_fd};
        if (pthread_create(&c->th, NULL, conn_run, c)) {
            close(fd);
            continue;
        }
        nconns++;
    }
    /* Wake connections still open (their workers are done) and wait. */
    for (int i = 0; i < nconns; i++) {
        shutdown(conns[i].fd, SHUT_RDWR);
        pthread_join(conns[i].th, NULL);
        close(conns[i].fd);
    }
    close(listen_fd);
    return 0;
}

void bu_print_json_string(const char *s) {
    putchar('"');
    for (const char *p = s; *p; p++)
        putchar(*p == '"' ? '\'' : *p == '\\' || (unsigned char)*p < 0x20 ? ' ' : *p);
    putchar('"');
}

/* ================================================== driver: processes */

extern char **environ;

int bu_driver_init(bu_driver *d, const char *prog, const char *bin_dir) {
    d->prog = prog;
    ssize_t len = readlink("/proc/self/exe", d->exe, sizeof d->exe - 1);
    if (len <= 0) {
        fprintf(stderr, "%s: /proc/self/exe: %s\n", prog, strerror(errno));
        return -1;
    }
    d->exe[len] = 0;
    if (bin_dir) {
        snprintf(d->psserver, sizeof d->psserver, "%s/psserver", bin_dir);
    } else {
        /* The build puts bench/<prog> beside bin/psserver. */
        int dirlen = (int)(strrchr(d->exe, '/') - d->exe);
        if (dirlen > PATH_MAX - 32) dirlen = PATH_MAX - 32;
        snprintf(d->psserver, sizeof d->psserver, "%.*s/../bin/psserver", dirlen, d->exe);
    }
    if (access(d->psserver, X_OK)) {
        fprintf(stderr, "%s: %s: %s (see --bin-dir)\n", prog, d->psserver, strerror(errno));
        return -1;
    }
    return 0;
}

void bu_describe_status(int status, char *buf, size_t len) {
    if (WIFEXITED(status))
        snprintf(buf, len, "exit status %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(buf, len, "killed by signal %d", WTERMSIG(status));
    else
        snprintf(buf, len, "status %#x", status);
}

bu_child *bu_spawn(bu_driver *d, const char *name, char *const argv[], int pipe_in,
                   int pipe_out, char *err, size_t errlen) {
    int in[2] = {-1, -1}, out[2] = {-1, -1};
    bu_child *k = NULL;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    if (d->nkids == BU_MAX_KIDS) {
        cm_seterr(err, errlen, "too many processes");
        goto fail;
    }
    if ((pipe_in && pipe2(in, O_CLOEXEC)) || (pipe_out && pipe2(out, O_CLOEXEC))) {
        cm_seterr(err, errlen, "pipe: %s", strerror(errno));
        goto fail;
    }
    if (pipe_in) posix_spawn_file_actions_adddup2(&fa, in[0], 0);
    if (pipe_out) posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    k = &d->kids[d->nkids];
    memset(k, 0, sizeof *k);
    snprintf(k->name, sizeof k->name, "%s", name);
    k->in_fd = k->out_fd = -1;
    int rc = posix_spawn(&k->pid, argv[0], &fa, NULL, argv, environ);
    if (rc) {
        cm_seterr(err, errlen, "cannot start %s (%s): %s", name, argv[0], strerror(rc));
        k = NULL;
        goto fail;
    }
    d->nkids++;
    if (pipe_in) {
        close(in[0]);
        k->in_fd = in[1];
    }
    if (pipe_out) {
        close(out[1]);
        k->out_fd = out[0];
    }
    posix_spawn_file_actions_destroy(&fa);
    return k;
fail:
    for (int i = 0; i < 2; i++) {
        if (in[i] >= 0) close(in[i]);
        if (out[i] >= 0) close(out[i]);
    }
    posix_spawn_file_actions_destroy(&fa);
    return NULL;
}

/* Reap k if it has exited by 'until' (a cm_now() value). 1 if reaped. */
static int reap_by(bu_child *k, double until) { return bu_reap_by(&k->pid, &k->status, until); }

void bu_stop_all(bu_driver *d) {
    for (int i = 0; i < d->nkids; i++)
        if (d->kids[i].pid > 0) kill(d->kids[i].pid, SIGTERM);
    double until = cm_now() + 2.0;
    for (int i = 0; i < d->nkids; i++) {
        bu_child *k = &d->kids[i];
        if (!reap_by(k, until)) {
            kill(k->pid, SIGKILL);
            while (waitpid(k->pid, &k->status, 0) < 0 && errno == EINTR) {
            }
            k->pid = 0;
        }
    }
    for (int i = 0; i < d->nkids; i++) {
        if (d->kids[i].in_fd >= 0) close(d->kids[i].in_fd);
        if (d->kids[i].out_fd >= 0) close(d->kids[i].out_fd);
    }
    d->nkids = 0;
}

int bu_expect_exit(bu_driver *d, bu_child *k, double timeout_s, char *err, size_t errlen) {
    double until = cm_now() + timeout_s;
    if (until > d->deadline) until = d->deadline;
    if (!reap_by(k, until)) {
        cm_seterr(err, errlen, "%s did not exit", k->name);
        return CM_ETIMEDOUT;
    }
    if (!WIFEXITED(k->status) || WEXITSTATUS(k->status) != 0) {
        char why[64];
        bu_describe_status(k->status, why, sizeof why);
        cm_seterr(err, errlen, "%s failed (%s)", k->name, why);
        return CM_EIO;
    }
    return CM_OK;
}

/* A watched child (a server) that exited early is a failure. */
static int check_watched(bu_driver *d, char *err, size_t errlen) {
    for (int i = 0; i < d->nkids; i++) {
        bu_child *k = &d->kids[i];
        if (!k->watch || k->pid <= 0 || !reap_by(k, 0.0)) continue;
        char why[64];
        bu_describe_status(k->status, why, sizeof why);
        cm_seterr(err, errlen, "%s exited early (%s)", k->name, why);
        return CM_EIO;
    }
    return CM_OK;
}

int bu_next_line(bu_driver *d, bu_child **ks, int n, char *line, size_t cap, char *err,
                 size_t errlen) {
    for (;;) {
        for (int i = 0; i < n; i++) {
            bu_child *k = ks[i];
            char *nl = memchr(k->buf, '\n', k->len);
            if (!nl) continue;
            size_t m = (size_t)(nl - k->buf);
            snprintf(line, cap, "%.*s", (int)m, k->buf);
            k->len -= m + 1;
            memmove(k->buf, nl + 1, k->len);
            return i;
        }
        double left = d->deadline - cm_now();
        if (bu_got_signal) {
            cm_seterr(err, errlen, "interrupted by signal %d", (int)bu_got_signal);
            return -1;
        }
        if (left <= 0) {
            cm_seterr(err, errlen, "the run passed its --timeout");
            return -1;
        }
        struct pollfd pf[BU_MAX_KIDS];
        for (int i = 0; i < n; i++) pf[i] = (struct pollfd){.fd = ks[i]->out_fd, .events = POLLIN};
        int r = poll(pf, (nfds_t)n, left < 0.1 ? (int)(left * 1e3) + 1 : 100);
        if (r < 0 && errno != EINTR) {
            cm_seterr(err, errlen, "poll: %s", strerror(errno));
            return -1;
        }
        /* A server gone while nothing more came: lines written before it
         * left are read first (a worker prints its last line, then stops
         * the servers, which may exit before this loop reads that line). */
        if (r == 0 && check_watched(d, err, errlen)) return -1;
        for (int i = 0; r > 0 && i < n; i++) {
            if (!pf[i].revents) continue;
            bu_child *k = ks[i];
            ssize_t got = read(k->out_fd, k->buf + k->len, sizeof k->buf - k->len);
            if (got > 0) {
                k->len += (size_t)got;
                if (k->len == sizeof k->buf && !memchr(k->buf, '\n', k->len)) {
                    cm_seterr(err, errlen, "%s wrote a line that is too long", k->name);
                    return -1;
                }
            } else if (got == 0 || errno != EINTR) {
                char why[64] = "still running";
                if (reap_by(k, cm_now() + 1.0)) bu_describe_status(k->status, why, sizeof why);
                cm_seterr(err, errlen, "%s stopped answering (%s)", k->name, why);
                return -1;
            }
        }
    }
}

int bu_send_command(bu_child *k, const char *cmd, char *err, size_t errlen) {
    if (write(k->in_fd, cmd, strlen(cmd)) != (ssize_t)strlen(cmd)) {
        cm_seterr(err, errlen, "cannot write to %s: %s", k->name, strerror(errno));
        return CM_EIO;
    }
    return CM_OK;
}

/* ================================================== driver: the worker protocol */

/* One line from each of w[0..nw), in the order they come, each passed to
 * fn with its worker's index; 'what' names the expected line in errors. */
static int one_line_each(bu_driver *d, bu_child **w, int nw, const char *prefix,
                         const char *what, int (*fn)(void *ctx, int i, const char *line),
                         void *ctx, char *err, size_t errlen) {
    bu_child *pending[BU_MAX_PROCS];
    int index[BU_MAX_PROCS], npending = nw;
    char line[1024];
    for (int i = 0; i < nw; i++) {
        pending[i] = w[i];
        index[i] = i;
    }
    while (npending > 0) {
        int i = bu_next_line(d, pending, npending, line, sizeof line, err, errlen);
        if (i < 0) return CM_EIO;
        if (strncmp(line, prefix, strlen(prefix)) || (fn && fn(ctx, index[i], line))) {
            cm_seterr(err, errlen, "%s said '%s' instead of %s", pending[i]->name, line, what);
            return CM_EIO;
        }
        pending[i] = pending[--npending];
        index[i] = index[npending];
    }
    return CM_OK;
}

int bu_workers_ready(bu_driver *d, bu_child **w, int nw,
                     int (*fn)(void *ctx, int i, const char *line), void *ctx, char *err,
                     size_t errlen) {
    return one_line_each(d, w, nw, "{\"ready\":", "ready", fn, ctx, err, errlen);
}

int bu_workers_round(bu_driver *d, bu_child **w, int nw,
                     int (*fn)(void *ctx, int i, const char *line), void *ctx, char *err,
                     size_t errlen) {
    int rc;
    for (int i = 0; i < nw; i++)
        if ((rc = bu_send_command(w[i], "go\n", err, errlen)) != CM_OK) return rc;
    return one_line_each(d, w, nw, "{", "its timings", fn, ctx, err, errlen);
}

int bu_workers_finish(bu_driver *d, bu_child **w, int nw, char *err, size_t errlen) {
    char line[1024];
    int rc;
    if ((rc = bu_send_command(w[0], "check\n", err, errlen)) != CM_OK) return rc;
    if (bu_next_line(d, w, 1, line, sizeof line, err, errlen) < 0) return CM_EIO;
    if (strncmp(line, "{\"check\":\"ok\"", 13)) {
        cm_seterr(err, errlen, "result check failed: %s", line);
        return CM_ECORRUPT;
    }
    for (int i = 0; i < nw; i++)
        if ((rc = bu_expect_exit(d, w[i], 30.0, err, errlen)) != CM_OK) return rc;
    return CM_OK;
}

/* ================================================== driver: servers */

/* Wait until every PS accepts connections. CM_EBUSY if one could not bind
 * its port (exit status 3: pick new ports and start again). */
static int wait_listening(bu_driver *d, bu_child **srv, const int *ports, int n, char *err,
                          size_t errlen) {
    int up[BU_MAX_PROCS] = {0}, nup = 0;
    double until = cm_now() + 30.0;
    while (nup < n) {
        for (int i = 0; i < n; i++) {
            if (!reap_by(srv[i], 0.0)) continue;
            if (WIFEXITED(srv[i]->status) && WEXITSTATUS(srv[i]->status) == BU_PORT_TAKEN)
                return CM_EBUSY;
            char why[64];
            bu_describe_status(srv[i]->status, why, sizeof why);
            cm_seterr(err, errlen, "%s failed to start (%s)", srv[i]->name, why);
            return CM_EIO;
        }
        for (int i = 0; i < n; i++)
            if (!up[i] && bu_port_accepts(ports[i])) {
                up[i] = 1;
                nup++;
            }
        if (nup == n) break;
        if (bu_got_signal || cm_now() > until || cm_now() > d->deadline) {
            cm_seterr(err, errlen, "the PS did not start listening");
            return CM_ETIMEDOUT;
        }
        usleep(5000);
    }
    return CM_OK;
}

/* 1 if a PS of this attempt exited with BU_PORT_TAKEN (waiting up to half
 * a second for it: it exits right after its bind fails). */
static int port_was_taken(bu_child **srv, int n) {
    double until = cm_now() + 0.5;
    for (int i = 0; i < n; i++)
        if (reap_by(srv[i], until) && WIFEXITED(srv[i]->status) &&
            WEXITSTATUS(srv[i]->status) == BU_PORT_TAKEN)
            return 1;
    return 0;
}

/* Servers srv[0..n) must now exit 0 on their own (within 30 s). */
static int servers_exit(bu_driver *d, bu_child **srv, int n, char *err, size_t errlen) {
    for (int i = 0; i < n; i++) {
        srv[i]->watch = 0;
        int rc = bu_expect_exit(d, srv[i], 30.0, err, errlen);
        if (rc != CM_OK) return rc;
    }
    return CM_OK;
}

/* The metrics scraper of a PS phase (bu_driver.scrape_ms). */
typedef struct scraper {
    bu_driver *d;
    const int *ports;
    int n;
    volatile int stop;
} scraper;

/* One GET /metrics of 127.0.0.1:port, read to the end; 1 if it said 200. */
static int scrape_once(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return 0;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int ok = 0;
    static const char req[] = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        write(fd, req, sizeof req - 1) == (ssize_t)(sizeof req - 1)) {
        char buf[16384];
        ssize_t n, total = 0;
        while ((n = read(fd, buf, sizeof buf)) > 0) {
            if (!total) ok = n >= 12 && !memcmp(buf + 9, "200", 3);
            total += n;
        }
    }
    close(fd);
    return ok;
}

static void *scraper_main(void *arg) {
    scraper *sc = arg;
    while (!sc->stop) {
        for (int i = 0; i < sc->n; i++)
            if (scrape_once(sc->ports[i])) __atomic_add_fetch(&sc->d->scrapes, 1, __ATOMIC_RELAXED);
        usleep((useconds_t)sc->d->scrape_ms * 1000);
    }
    return NULL;
}

/* One attempt of a PS phase on fresh ports. Returns CM_EBUSY if a PS found
 * its port taken (a connect to the port may have reached the other
 * listener first, so this is checked after any failure, not only while
 * waiting for the PS). */
static int ps_attempt(bu_driver *d, int servers, int workers,
                      int (*run)(void *ctx, bu_driver *d, const char *ps_hosts, char *err,
                                 size_t errlen),
                      void *ctx, char *err, size_t errlen) {
    bu_child *srv[BU_MAX_PROCS];
    char ps_hosts[BU_MAX_PROCS * 24], worker_hosts[BU_MAX_PROCS * 24], name[32];
    char maddr[BU_MAX_PROCS][32];
    int rc = CM_EIO, ports[BU_MAX_KIDS + BU_MAX_PROCS], nsrv = 0;
    int nm = d->scrape_ms > 0 ? servers : 0;
    size_t lp = 0, lw = 0;
    if (bu_free_ports(ports, servers + workers + nm) != CM_OK) {
        cm_seterr(err, errlen, "cannot find free ports: %s", strerror(errno));
        goto fail;
    }
    for (int i = 0; i < servers; i++)
        lp += (size_t)snprintf(ps_hosts + lp, sizeof ps_hosts - lp, "%s127.0.0.1:%d",
                               i ? "," : "", ports[i]);
    for (int i = 0; i < workers; i++)
        lw += (size_t)snprintf(worker_hosts + lw, sizeof worker_hosts - lw, "%s127.0.0.1:%d",
                               i ? "," : "", ports[servers + i]);
    for (; nsrv < servers; nsrv++) {
        char idx[24];
        snprintf(idx, sizeof idx, "%d", nsrv);
        snprintf(name, sizeof name, "psserver %d", nsrv);
        char *argv[20] = {d->psserver, "--ps-hosts", ps_hosts, "--worker-hosts", worker_hosts,
                          "--task-index", idx, NULL};
        int k = 0;
        for (; d->ps_extra[k] && k < 8; k++) argv[7 + k] = d->ps_extra[k];
        if (nm) {
            snprintf(maddr[nsrv], sizeof maddr[nsrv], "127.0.0.1:%d",
                     ports[servers + workers + nsrv]);
            argv[7 + k] = "--metrics-listen";
            argv[8 + k] = maddr[nsrv];
        }
        if (!(srv[nsrv] = bu_spawn(d, name, argv, 0, 0, err, errlen))) goto fail;
        srv[nsrv]->watch = 1;
    }
    if ((rc = wait_listening(d, srv, ports, servers, err, errlen)) != CM_OK) goto fail;
    scraper sc = {.d = d, .ports = ports + servers + workers, .n = nm};
    pthread_t th;
    int scraping = nm && pthread_create(&th, NULL, scraper_main, &sc) == 0;
    rc = run(ctx, d, ps_hosts, err, errlen);
    if (scraping) {
        sc.stop = 1;
        pthread_join(th, NULL);
    }
    if (rc != CM_OK) goto fail;
    /* The workers asked every PS to shut down. */
    if ((rc = servers_exit(d, srv, servers, err, errlen)) != CM_OK) goto fail;
    bu_stop_all(d);
    return CM_OK;
fail:
    if (rc != CM_EBUSY && !bu_got_signal && port_was_taken(srv, nsrv)) rc = CM_EBUSY;
    bu_stop_all(d);
    return rc;
}

int bu_ps_phase(bu_driver *d, int servers, int workers,
                int (*run)(void *ctx, bu_driver *d, const char *ps_hosts, char *err,
                           size_t errlen),
                void *ctx, char *err, size_t errlen) {
    for (int attempt = 1;; attempt++) {
        int rc = ps_attempt(d, servers, workers, run, ctx, err, errlen);
        if (rc != CM_EBUSY) return rc;
        fprintf(stderr, "%s: a PS port was taken; starting again on new ports\n", d->prog);
        if (attempt == 5) {
            cm_seterr(err, errlen, "a PS found its port taken 5 times in a row");
            return CM_EBUSY;
        }
    }
}

/* Start a server of this binary (argv) that picks its own port on
 * 127.0.0.1 and prints {"port":N}; it is watched. NULL with a message in
 * err on failure. */
static bu_child *start_tcp_server(bu_driver *d, const char *name, char *const argv[], int *port,
                                  char *err, size_t errlen) {
    char line[256];
    bu_child *k = bu_spawn(d, name, argv, 0, 1, err, errlen);
    if (!k) return NULL;
    k->watch = 1;
    if (bu_next_line(d, &k, 1, line, sizeof line, err, errlen) < 0) return NULL;
    if (sscanf(line, "{\"port\":%d}", port) != 1) {
        cm_seterr(err, errlen, "%s said '%s' instead of its port", name, line);
        return NULL;
    }
    return k;
}

int bu_tcp_phase(bu_driver *d, int servers, char *const *server_argv[],
                 int (*run)(void *ctx, bu_driver *d, const char *ports, char *err,
                            size_t errlen),
                 void *ctx, char *err, size_t errlen) {
    bu_child *srv[BU_MAX_PROCS];
    char ports[BU_MAX_PROCS * 8] = "", name[32];
    size_t lp = 0;
    int rc = CM_EIO;
    for (int i = 0; i < servers; i++) {
        int port;
        snprintf(name, sizeof name, "tcp-server %d", i);
        if (!(srv[i] = start_tcp_server(d, name, server_argv[i], &port, err, errlen))) goto fail;
        lp += (size_t)snprintf(ports + lp, sizeof ports - lp, "%s%d", i ? "," : "", port);
    }
    if ((rc = run(ctx, d, ports, err, errlen)) != CM_OK) goto fail;
    /* The workers stopped every server. */
    if ((rc = servers_exit(d, srv, servers, err, errlen)) != CM_OK) goto fail;
    bu_stop_all(d);
    return CM_OK;
fail:
    bu_stop_all(d);
    return rc;
}

/* ================================================== load */

double bu_load_average(void) {
    double l = -1.0;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        if (fscanf(f, "%lf", &l) != 1) l = -1.0;
        fclose(f);
    }
    return l;
}

/* utime + stime of process pid (0: this one), every thread, in seconds;
 * 0 if it cannot be read (it just exited). */
static double proc_cpu_s(pid_t pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, pid ? "/proc/%d/stat" : "/proc/self/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0.0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    /* Fields after the command (which may hold spaces): state is the 3rd,
     * utime and stime the 14th and 15th. */
    char *p = strrchr(buf, ')');
    unsigned long long ut = 0, st = 0;
    if (!p || sscanf(p + 1, " %*c %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %llu %llu", &ut,
                     &st) != 2)
        return 0.0;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

void bu_cpu_sample_take(const bu_driver *d, bu_cpu_sample *s) {
    *s = (bu_cpu_sample){.wall = cm_now(), .load1 = bu_load_average()};
    FILE *f = fopen("/proc/stat", "r");
    unsigned long long v[8] = {0};
    if (f) {
        if (fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3],
                   &v[4], &v[5], &v[6], &v[7]) != 8)
            memset(v, 0, sizeof v);
        fclose(f);
    }
    /* user nice system idle iowait irq softirq steal: all but idle and
     * iowait are busy. */
    double tick = 1.0 / (double)sysconf(_SC_CLK_TCK);
    int nread = 2;
    s->busy_s = (double)(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) * tick;
    s->ours_s = proc_cpu_s(0);
    for (int i = 0; i < d->nkids; i++)
        if (d->kids[i].pid > 0) {
            s->ours_s += proc_cpu_s(d->kids[i].pid);
            nread++;
        }
    s->res_s = nread * tick;
}

double bu_cpu_others_s(const bu_cpu_sample *a, const bu_cpu_sample *b) {
    double o = (b->busy_s - a->busy_s) - (b->ours_s - a->ours_s);
    return o > 0.0 ? o : 0.0;
}
