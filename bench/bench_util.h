/* bench_util.h - what the benchmarks' drivers share: medians, child
 * processes, ports on 127.0.0.1, signals, the driver/worker protocol of the
 * multi-process benchmarks (psbench, sparsebench), machine load.
 * SPDX-License-Identifier: MIT
 */
#ifndef BENCH_UTIL_H
#define BENCH_UTIL_H
#include <limits.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* qsort comparator for doubles, ascending. */
int bu_cmp_double(const void *a, const void *b);

/* The median of v[0..n) (v is not changed); 0 when n <= 0. */
double bu_median(const double *v, int n);

/* The q-quantile (0 <= q <= 1) of v[0..n), nearest rank: the smallest
 * value with at least q * n values at or below it (v is not changed); 0
 * when n <= 0. */
double bu_quantile(const double *v, int n, double q);

/* Reap the child *pid if it has exited by 'until' (a cm_now() value),
 * polling every 1 ms: then *status is its waitpid() status, *pid is 0 and
 * it returns 1. A *pid <= 0 counts as reaped. */
int bu_reap_by(pid_t *pid, int *status, double until);

/* n distinct ports on 127.0.0.1 that were free a moment ago (bound
 * together, then released). CM_OK or CM_EIO. */
int bu_free_ports(int *ports, int n);

/* 1 if something accepts TCP connections on 127.0.0.1:port. */
int bu_port_accepts(int port);

/* SIGINT, SIGTERM and SIGHUP call fn; SIGPIPE is ignored. */
void bu_catch_signals(void (*fn)(int));

/* A handler for bu_catch_signals that records the signal in bu_got_signal,
 * which every wait of the bu_driver functions checks. */
extern volatile sig_atomic_t bu_got_signal;
void bu_on_signal(int sig);

/* ================================================== sockets and lines */

/* All n bytes, retrying short transfers and EINTR. 0, or -1 on error/EOF. */
int bu_send_all(int fd, const void *p, size_t n, int flags);
int bu_recv_all(int fd, void *p, size_t n);

/* A TCP connection to 127.0.0.1:port with TCP_NODELAY (retried for about
 * two seconds while nothing listens yet), or -1. */
int bu_tcp_connect(int port);

/* --calls stream|unary (ps_client_cfg.unary): *unary set, 0; or -1 after
 * telling stderr what 'prog' takes. */
int bu_parse_calls(const char *prog, const char *arg, int *unary);

/* Read one line from stdin (the driver's commands); 0 if it is 'want'. */
int bu_read_command(const char *want);

/* Split "a,b,c" (copied into 'copy', which the caller frees) into at most
 * max pieces; returns the count, or -1 if there are more. */
int bu_split_list(const char *csv, char **copy, char **out, int max);

/* A plain-TCP reference server: listen on 127.0.0.1 (a port of its own,
 * printed on stdout as {"port":N}) and serve each connection (at most
 * BU_MAX_CONNS, TCP_NODELAY) on a thread of its own with serve(ctx, fd,
 * listen_fd) until one of them calls shutdown(listen_fd, SHUT_RDWR); then
 * wake the connections still open, join them and close every socket.
 * Returns 0, or 1 after a message on stderr naming 'who'. */
#define BU_MAX_CONNS 64
int bu_tcp_serve(const char *who, void (*serve)(void *ctx, int fd, int listen_fd), void *ctx);

/* s on stdout as a JSON string: quoted, each double quote as a single
 * one, each backslash or control character as a space (error messages in
 * a verdict). */
void bu_print_json_string(const char *s);

/* ================================================== driver: processes */

#define BU_MAX_PROCS 16 /* Servers or workers of one configuration. */
#define BU_MAX_KIDS (2 * BU_MAX_PROCS)
#define BU_PORT_TAKEN 3 /* psserver's exit status when it cannot bind. */

/* A child process and the driver's ends of its pipes. */
typedef struct bu_child {
    char name[32];  /* "ps 0", "worker 1", for messages. */
    pid_t pid;      /* 0 once reaped. */
    int in_fd;      /* Its stdin, or -1. */
    int out_fd;     /* Its stdout, or -1. */
    int watch;      /* A server: its exit before the end is a failure. */
    int status;     /* waitpid() status once reaped. */
    char buf[1024]; /* Output not yet split into lines. */
    size_t len;
} bu_child;

/* A benchmark driver's state: used by one thread. */
typedef struct bu_driver {
    const char *prog;        /* "psbench", for messages. */
    char exe[PATH_MAX];      /* This binary, re-executed for the roles. */
    char psserver[PATH_MAX]; /* The PS binary. */
    double deadline;         /* cm_now() by which the whole run must end. */
    bu_child kids[BU_MAX_KIDS]; /* The current phase's processes. */
    int nkids;
    char *ps_extra[9];          /* More psserver arguments (NULL-terminated;
                                 * e.g. a token file and TLS files). */
    /* > 0: every psserver of a PS phase serves Prometheus metrics
     * (--metrics-listen on a free port) and a thread of the driver scrapes
     * each every scrape_ms while the phase's workers run. */
    int scrape_ms;
    uint64_t scrapes;           /* Scrapes answered with 200, over the run. */
} bu_driver;

/* Fill d->exe (/proc/self/exe) and d->psserver (bin_dir/psserver, or
 * <this binary's dir>/../bin/psserver as the build lays them out) and check
 * that the latter can be run. 0, or -1 after a message on stderr. */
int bu_driver_init(bu_driver *d, const char *prog, const char *bin_dir);

/* "exit status 1", "killed by signal 9", ... */
void bu_describe_status(int status, char *buf, size_t len);

/* Start argv[0] with stdin and/or stdout piped to the driver. Returns the
 * new child, or NULL with a message in err. */
bu_child *bu_spawn(bu_driver *d, const char *name, char *const argv[], int pipe_in,
                   int pipe_out, char *err, size_t errlen);

/* Stop every child of the phase by its PID (SIGTERM, then SIGKILL after
 * two seconds), reap them all and close their pipes. */
void bu_stop_all(bu_driver *d);

/* Wait up to timeout_s (and the run's deadline) for k to exit with status
 * 0. Returns CM_OK, or an error with a message. */
int bu_expect_exit(bu_driver *d, bu_child *k, double timeout_s, char *err, size_t errlen);

/* The next complete stdout line of any of ks[0..n), into line. Returns the
 * index in ks, or -1 with a message (timeout, signal, a child that closed
 * its output, a watched child that exited). */
int bu_next_line(bu_driver *d, bu_child **ks, int n, char *line, size_t cap, char *err,
                 size_t errlen);

/* Write cmd (a line) to k's stdin. CM_OK or CM_EIO with a message. */
int bu_send_command(bu_child *k, const char *cmd, char *err, size_t errlen);

/* ================================================== driver: the worker protocol */

/* A worker prints {"ready":RANK...} once set up, then for each "go" line
 * it reads one line of results, and worker 0 answers "check" with
 * {"check":"ok"...} or anything else for a failed check; then every worker
 * exits 0. */

/* Wait for the nw "ready" lines; each is passed to fn (may be NULL) with
 * its worker's index in w, and fn returning nonzero fails the phase. */
int bu_workers_ready(bu_driver *d, bu_child **w, int nw,
                     int (*fn)(void *ctx, int i, const char *line), void *ctx, char *err,
                     size_t errlen);

/* Send "go" to every worker and pass the one line each answers to fn
 * (with its index in w); fn returns 0, or nonzero for a line it cannot
 * read (the phase fails, naming the line). */
int bu_workers_round(bu_driver *d, bu_child **w, int nw,
                     int (*fn)(void *ctx, int i, const char *line), void *ctx, char *err,
                     size_t errlen);

/* "check" to worker 0 and its verdict (CM_ECORRUPT if not ok), then every
 * worker must exit 0. */
int bu_workers_finish(bu_driver *d, bu_child **w, int nw, char *err, size_t errlen);

/* ================================================== driver: servers */

/* A PS phase on fresh ports: start S psserver processes for W workers
 * (every one on 127.0.0.1, watched), wait until they listen, then call
 * run(ctx, d, ps_hosts) to start and run the workers; the workers must
 * have asked every PS to shut down: each must then exit 0 within 30 s. All
 * children are stopped by PID at the end. Started again on new ports while
 * a PS finds its port taken (5 tries). */
int bu_ps_phase(bu_driver *d, int servers, int workers,
                int (*run)(void *ctx, bu_driver *d, const char *ps_hosts, char *err,
                           size_t errlen),
                void *ctx, char *err, size_t errlen);

/* The plain-TCP phase: start servers 0..S-1 of this binary (server i runs
 * server_argv[i]; each picks its own port on 127.0.0.1 and prints it, as
 * bu_tcp_serve does; watched), then call run(ctx, d, ports) with their
 * ports as "p0,p1,..." to start and run the workers, which must have
 * stopped every server: each must then exit 0 within 30 s. All children
 * are stopped by PID at the end. */
int bu_tcp_phase(bu_driver *d, int servers, char *const *server_argv[],
                 int (*run)(void *ctx, bu_driver *d, const char *ports, char *err,
                            size_t errlen),
                 void *ctx, char *err, size_t errlen);

/* ================================================== load */

/* The 1-minute load average (other jobs on a shared machine), or -1. */
double bu_load_average(void);

/* CPU time on the machine at one instant: every core's busy time
 * (/proc/stat) and this driver's and its current children's (/proc/PID/stat,
 * every thread). Between two samples, busy minus ours is what other
 * processes used. */
typedef struct bu_cpu_sample {
    double wall;   /* cm_now() */
    double busy_s; /* All cores' non-idle time since boot. */
    double ours_s; /* This process and d's live children. */
    double load1;  /* bu_load_average() */
    double res_s;  /* The clock tick times the counters read: how far
                    * others' time between two samples may be off. */
} bu_cpu_sample;

void bu_cpu_sample_take(const bu_driver *d, bu_cpu_sample *s);

/* CPU seconds other processes used between a and b (>= 0). */
double bu_cpu_others_s(const bu_cpu_sample *a, const bu_cpu_sample *b);

#endif /* BENCH_UTIL_H */
