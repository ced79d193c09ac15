/* ps_main.c - the psserver command: one PS shard as a process.
 * SPDX-License-Identifier: MIT
 *
 * Reads its task from TF_CONFIG (type "ps"), or from flags, and serves until
 * the chief sends Shutdown (or SIGINT/SIGTERM), then exits 0. It needs no
 * model flag: the model comes with the chief's Initialize (or from the
 * data directory of a restarted shard), and the placement follows from it
 * and the number of PS, exactly as the workers compute it.
 * Exit status: 0 after a shutdown, 1 on errors, 3 if the address could not
 * be bound (so a launcher can pick another port and retry).
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/cm_cluster.h"
#include "common/cm_http.h"
#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_model.h"
#include "common/cm_placement.h"
#include "common/cm_status.h"
#include "common/cm_token.h"
#include "ps/ps_server.h"
#include "storage/st_store.h"

static volatile sig_atomic_t got_signal;

static void on_signal(int sig) { got_signal = sig; }

/* psserver --repair DIR: st_store_repair, said on stdout (0) or stderr (1).
 * A long-only option: its value is no letter that another option could take too. */
#define OPT_REPAIR 0x100
#define OPT_CKPT_SYNC 0x101
#define OPT_CKPT_ASYNC 0x102
#define OPT_METRICS 0x103
static int repair(const char *dir) {
    char err[1024];
    int n = st_store_repair(dir, err, sizeof err);
    if (n < 0) {
        fprintf(stderr, "psserver: cannot repair %s: %s\n", dir, err);
        return 1;
    }
    printf("psserver: repaired %s: %d committed checkpoint%s kept (LevelDB's account: %s/LOG, "
           "what it could not read: %s/lost); start psserver on it as before\n",
           dir, n, n == 1 ? "" : "s", dir, dir);
    return 0;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: psserver [options]\n"
            "Serve one parameter-server shard over gRPC.\n\n"
            "The task comes from TF_CONFIG ({\"cluster\":{\"ps\":[...],\"worker\":[...]},\n"
            "\"task\":{\"type\":\"ps\",\"index\":I}}); flags override it.\n\n"
            "  --ps-hosts H:P,...         the PS list (overrides TF_CONFIG's)\n"
            "  --worker-hosts H:P,...     the worker list\n"
            "  --task-index I             this shard's index in the PS list\n"
            "  --listen ADDR              bind here instead of the PS list's address\n"
            "                             (e.g. 0.0.0.0:5000)\n"

            "  --threads N                gRPC threads (default: 1 on machines with up to\n"
            "                             4 CPUs, where a second thread only contends with\n"
            "                             the first and with the workers; 2 otherwise)\n"
            "  --max-message-mb N         gRPC message limit (default 64)\n"
            "  --data-dir DIR             keep this shard's checkpoints in DIR/shard-<i>\n"
            "                             and restore the newest one on start\n"
            "  --repair DIR               rebuild the checkpoint store of one shard in DIR\n"
            "                             (e.g. DATA/shard-0) from the files it can read, when\n"
            "                             psserver refuses it (e.g. its CURRENT file lost);\n"
            "                             then exit\n"
            "  --checkpoint-every K       checkpoint every K versions (default 0: never)\n"
            "  --checkpoint-sync          (default) pushes wait while a checkpoint is\n"
            "                             written: a crash loses at most --checkpoint-every\n"
            "                             versions, plus the steps in flight (a stall of one\n"
            "                             write per checkpoint)\n"
            "  --checkpoint-async         pushes go on while a checkpoint is written (one due\n"
            "                             meanwhile holds them until the writer takes it):\n"
            "                             less stall, but a crash may lose up to twice\n"
            "                             --checkpoint-every versions\n"
            "  --checkpoint-nice N        nice value of the checkpoint writer thread, 0-19\n"
            "                             (default 10: the handlers keep the cores they\n"
            "                             need; checkpoints take longer where they are busy)\n"
            "\nSecurity (see the README's \"Security model\"):\n"
            "  --auth-token-file F        refuse every call without the token in F (first\n"
            "                             line, 16-512 bytes) or the admin's\n"
            "  --admin-token-file F       the token Initialize, Rollback, Shutdown and a\n"
            "                             Checkpoints that deletes need (the chief's);\n"
            "                             default: the auth token (anyone with it is admin)\n"
            "  --tls-cert F --tls-key F   serve TLS with this PEM certificate chain and key\n"
            "  --tls-ca F                 and require client certificates signed by this CA\n"
            "  --max-parked-pulls N       Pulls waiting for a version at once (default\n"
            "                             4096); more get RESOURCE_EXHAUSTED\n"
            "  --max-held N               calls in progress at once (default 20000)\n"
            "  --max-streams N            concurrent calls per connection, and per stream of\n"
            "                             calls (default 256)\n"
            "  --idle-timeout-ms N        close connections idle this long (default 600000)\n"
            "  --poll-spin-us N           each gRPC thread polls this long, yielding its core,\n"
            "                             before it sleeps (default 50; -1: sleep at once)\n"
            "\nValues and memory:\n"
            "  --skip-nonfinite           drop pushes with NaN/inf (counted) instead of\n"
            "                             refusing them with INVALID_ARGUMENT\n"
            "  --memory-limit-mb N        the shard's memory; an Initialize or push that\n"
            "                             needs more gets RESOURCE_EXHAUSTED (default: half\n"
            "                             of the machine's or the cgroup's memory)\n"
            "  --max-step-ahead N         async: refuse a push more than N steps past its\n"
            "                             worker's last (default 1048576)\n"
            "\nEmbedding tables larger than memory:\n"
            "  --memory-mb X              keep at most X MiB of embedding rows (values and\n"
            "                             optimizer state) in memory, the others in a\n"
            "                             LevelDB row store on disk (default: all in memory)\n"
            "  --rows-dir DIR             the row store's directory: with --data-dir the\n"
            "                             checkpoints' rows too, kept (default DATA_DIR/rows-<i>);\n"
            "                             else scratch, emptied at start (default: a\n"
            "                             private directory under $TMPDIR, removed at exit)\n"
            "  --admit-after K            create a row only once training pulls found it\n"
            "                             missing K times (1-255; counted in a 4 MiB\n"
            "                             count-min sketch); until then it reads as its\n"
            "                             initial values and its gradients are dropped\n"
            "  --expire-after-steps T     drop rows unused for T versions (default: never)\n"
            "\nObserving:\n"
            "  --metrics-listen HOST:PORT serve Prometheus metrics at http://HOST:PORT/metrics\n"
            "                             (plain HTTP, no token: counters only; bind it where\n"
            "                             only the scraper reaches)\n"
            "  -h, --help                 this text\n");
}

static char *render_metrics(void *ud, size_t *len) { return ps_server_metrics(ud, len); }

int main(int argc, char **argv) {
    static const struct option opts[] = {{"ps-hosts", required_argument, 0, 'p'},
                                         {"worker-hosts", required_argument, 0, 'w'},
                                         {"task-index", required_argument, 0, 'i'},
                                         {"listen", required_argument, 0, 'l'},
                                         {"metrics-listen", required_argument, 0, OPT_METRICS},
                                         {"threads", required_argument, 0, 't'},
                                         {"max-message-mb", required_argument, 0, 'M'},
                                         {"data-dir", required_argument, 0, 'd'},
                                         {"repair", required_argument, 0, OPT_REPAIR},
                                         {"checkpoint-every", required_argument, 0, 'k'},
                                         {"checkpoint-nice", required_argument, 0, 'n'},
                                         {"checkpoint-sync", no_argument, 0, OPT_CKPT_SYNC},
                                         {"checkpoint-async", no_argument, 0, OPT_CKPT_ASYNC},
                                         {"auth-token-file", required_argument, 0, 'A'},
                                         {"admin-token-file", required_argument, 0, 'B'},
                                         {"tls-cert", required_argument, 0, 'C'},
                                         {"tls-key", required_argument, 0, 'K'},
                                         {"tls-ca", required_argument, 0, 'R'},
                                         {"max-held", required_argument, 0, 'H'},
                                         {"max-parked-pulls", required_argument, 0, 'P'},
                                         {"skip-nonfinite", no_argument, 0, 'N'},
                                         {"memory-limit-mb", required_argument, 0, 'L'},
                                         {"max-step-ahead", required_argument, 0, 'E'},
                                         {"max-streams", required_argument, 0, 'S'},
                                         {"idle-timeout-ms", required_argument, 0, 'I'},
                                         {"poll-spin-us", required_argument, 0, 'Y'},
                                         {"memory-mb", required_argument, 0, 'm'},
                                         {"rows-dir", required_argument, 0, 'r'},
                                         {"admit-after", required_argument, 0, 'a'},
                                         {"expire-after-steps", required_argument, 0, 'x'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *ps_hosts = NULL, *worker_hosts = NULL, *listen = NULL, *data_dir = NULL;
    const char *metrics_addr = NULL;
    long long ckpt_every = 0;
    int ckpt_nice = 10;
    int ckpt_sync = 1;
    int task_index = -1, threads = 0, max_mb = 64;
    const char *auth_file = NULL, *admin_file = NULL, *tls_cert = NULL, *tls_key = NULL,
               *tls_ca = NULL;
    long max_held = 0, max_streams = 0, idle_ms = 0, max_parked = 0, poll_spin = 0;
    int skip_nonfinite = 0;
    long long mem_mb = 0, max_ahead = 0;
    double rows_mb = 0.0;
    int admit_after = 0;
    long long expire_after = 0;
    const char *rows_dir = NULL;
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'p': ps_hosts = optarg; break;
        case 'w': worker_hosts = optarg; break;
        case 'i': task_index = atoi(optarg); break;
        case 'l': listen = optarg; break;
        case OPT_METRICS: metrics_addr = optarg; break;
        case 't': threads = atoi(optarg); break;
        case 'M': max_mb = atoi(optarg); break;
        case 'd': data_dir = optarg; break;
        case OPT_REPAIR: return repair(optarg);
        case 'k': ckpt_every = atoll(optarg); break;
        case 'n': ckpt_nice = atoi(optarg); break;
        case OPT_CKPT_SYNC: ckpt_sync = 1; break;
        case OPT_CKPT_ASYNC: ckpt_sync = 0; break;
        case 'A': auth_file = optarg; break;
        case 'B': admin_file = optarg; break;
        case 'C': tls_cert = optarg; break;
        case 'K': tls_key = optarg; break;
        case 'R': tls_ca = optarg; break;
        case 'H': max_held = atol(optarg); break;
        case 'P': max_parked = atol(optarg); break;
        case 'N': skip_nonfinite = 1; break;
        case 'L': mem_mb = atoll(optarg); break;
        case 'E': max_ahead = atoll(optarg); break;
        case 'S': max_streams = atol(optarg); break;
        case 'I': idle_ms = atol(optarg); break;
        case 'Y': poll_spin = atol(optarg); break;
        case 'm': rows_mb = atof(optarg); break;
        case 'r': rows_dir = optarg; break;
        case 'a': admit_after = atoi(optarg); break;
        case 'x': expire_after = atoll(optarg); break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return CM_EXIT_CONFIG;
        }
    }
    /* Each bad value named, with what is allowed. */
    const char *bad =
        optind < argc                                       ? "an argument that is not an option"
        : threads < 0 || threads > 64                       ? "--threads: 1-64"
        : max_mb < 1 || max_mb > 2047                       ? "--max-message-mb: 1-2047"
        : ckpt_every < 0                                    ? "--checkpoint-every: >= 0"
        : ckpt_every > 0 && !data_dir                       ? "--checkpoint-every needs --data-dir"
        : ckpt_nice < 0 || ckpt_nice > 19                   ? "--checkpoint-nice: 0-19"
        : max_held < 0 || max_held > 1000000                ? "--max-held: 0-1000000"
        : max_parked < 0 || max_parked > 1000000            ? "--max-parked-pulls: 0-1000000"
        : mem_mb < 0 || mem_mb > (1LL << 30)                ? "--memory-limit-mb: 0-2^30"
        : max_ahead < 0                                     ? "--max-step-ahead: >= 0"
        : max_streams < 0 || max_streams > 100000           ? "--max-streams: 0-100000"
        : idle_ms < 0 || idle_ms > 86400000L                ? "--idle-timeout-ms: 0-86400000"
        : poll_spin < -1 || poll_spin > 1000000             ? "--poll-spin-us: -1-1000000"
        : !(rows_mb >= 0.0) || rows_mb > (double)(1LL << 30) ? "--memory-mb: 0-2^30"
        : rows_dir && rows_mb == 0.0 && !data_dir           ? "--rows-dir needs --memory-mb or --data-dir"
        : admit_after < 0 || admit_after > 255              ? "--admit-after: 0-255"
        : expire_after < 0                                  ? "--expire-after-steps: >= 0"
                                                            : NULL;
    if (bad) {
        fprintf(stderr, "psserver: bad arguments: %s (see --help)\n", bad);
        return CM_EXIT_CONFIG;
    }
    if (!tls_cert != !tls_key || (tls_ca && !tls_cert)) {
        fprintf(stderr, "psserver: --tls-cert and --tls-key go together, and --tls-ca needs "
                        "them (see --help)\n");
        return CM_EXIT_CONFIG;
    }
    if (admin_file && !auth_file) {
        fprintf(stderr, "psserver: --admin-token-file needs --auth-token-file (the workers' "
                        "token)\n");
        return CM_EXIT_CONFIG;
    }
    cm_security sec = {0};
    char terr[600];
    if (cm_security_load(&sec, auth_file, admin_file, terr, sizeof terr) != CM_OK) {
        fprintf(stderr, "psserver: %s\n", terr);
        return CM_EXIT_CONFIG;
    }
    if (auth_file && !admin_file) memcpy(sec.admin_token, sec.token, sizeof sec.token);
    if (threads == 0) threads = ps_server_default_threads();
    cm_mem_keep_freed();
    char err[512];
    cm_cluster *cl = NULL;
    int rc = cm_cluster_from_env(&cl, err, sizeof err);
    if (rc != CM_OK && rc != CM_ENOTFOUND) {
        fprintf(stderr, "psserver: %s\n", err);
        return CM_EXIT_CONFIG;
    }
    if ((ps_hosts && cm_cluster_set_list(cl, CM_TASK_PS, ps_hosts, err, sizeof err)) ||
        (worker_hosts && cm_cluster_set_list(cl, CM_TASK_WORKER, worker_hosts, err, sizeof err))) {
        fprintf(stderr, "psserver: %s\n", err);
        cm_cluster_destroy(cl);
        return CM_EXIT_CONFIG;
    }
    if (task_index >= 0) cm_cluster_set_task(cl, CM_TASK_PS, task_index);
    if (cm_cluster_validate(cl, err, sizeof err) != CM_OK) {
        fprintf(stderr, "psserver: %s\n", err);
        cm_cluster_destroy(cl);
        return CM_EXIT_CONFIG;
    }
    if (cl->task_type != CM_TASK_PS) {
        fprintf(stderr, "psserver: this task is %s:%d, not a ps task\n",
                cm_task_type_name(cl->task_type), cl->task_index);
        cm_cluster_destroy(cl);
        return CM_EXIT_CONFIG;
    }
    char tag[32];
    snprintf(tag, sizeof tag, "ps %d", cl->task_index);
    cm_log_set_tag(tag);

    ps_server *srv = NULL;
    cm_http *metrics = NULL;
    int status = 1;
    char shard_dir[4096], rows_default[4096];
    if (data_dir) {
        snprintf(shard_dir, sizeof shard_dir, "%s/shard-%d", data_dir, cl->task_index);
        snprintf(rows_default, sizeof rows_default, "%s/rows-%d", data_dir, cl->task_index);
        if (!rows_dir) rows_dir = rows_default;
        if (mkdir(data_dir, 0777) != 0 && errno != EEXIST) {
            cm_error("cannot create %s: %s", data_dir, strerror(errno));
            goto out;
        }
    }
    ps_server_cfg cfg = {.nshards = cl->n[CM_TASK_PS], .shard = cl->task_index,
                         .threads = threads, .max_message = max_mb << 20,
                         .data_dir = data_dir ? shard_dir : NULL,
                         .checkpoint_every = ckpt_every, .checkpoint_nice = ckpt_nice,
                         .checkpoint_sync = ckpt_sync,
                         .auth_token = cm_security_token(&sec),
                         .admin_token = cm_security_admin(&sec),
                         .tls_cert = tls_cert, .tls_key = tls_key, .tls_ca = tls_ca,
                         .max_parked = (int)max_parked, .max_held = (int)max_held, .max_streams = (int)max_streams,
                         .idle_ms = (int)idle_ms, .poll_spin_us = (int)poll_spin,
                         .skip_nonfinite = skip_nonfinite,
                         .memory_limit = (size_t)mem_mb << 20, .max_step_ahead = max_ahead,
                         .rows_memory = (size_t)(rows_mb * (1 << 20)), .rows_dir = rows_dir,
                         .admit_after = admit_after, .expire_after = expire_after,
                         .num_workers = cm_cluster_num_trainers(cl)};
    /* Before the restore, which logs "restored version": a SIGTERM from then
     * on is a clean stop, not a death by signal. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    if (ps_server_create(&cfg, &srv) != CM_OK) goto out; /* Logged there. */
    const char *addr = listen ? listen : cm_cluster_self(cl);
    int port = 0;
    rc = ps_server_start(srv, addr, &port);
    if (rc != CM_OK) {
        cm_error("cannot listen on %s: %s", addr, cm_strerror(rc));
        status = rc == CM_EBUSY ? CM_EXIT_PORT : CM_EXIT_FAILED;
        goto out;
    }
    cm_info("serving shard %d of %d on %s, port %d (%s, %s)", cl->task_index,
            cl->n[CM_TASK_PS], addr, port,
            !auth_file ? "no authentication"
            : admin_file ? "tokens: workers and admin"
                         : "one token for workers and admin",
            tls_ca ? "mutual TLS" : tls_cert ? "TLS" : "plaintext");
    if (!auth_file && strncmp(addr, "127.", 4) != 0 && strncmp(addr, "localhost", 9) != 0)
        cm_warn("listening on %s without --auth-token-file: anyone who reaches the port can "
                "push, pull, roll back and shut this shard down", addr);
    if (metrics_addr) {
        char merr[256];
        int mport = 0;
        int mrc = cm_http_start(metrics_addr, render_metrics, srv, &metrics, &mport, merr,
                                sizeof merr);
        if (mrc != CM_OK) {
            cm_error("--metrics-listen: %s", merr);
            status = mrc == CM_EBUSY ? CM_EXIT_PORT : CM_EXIT_CONFIG;
            goto out;
        }
        cm_info("metrics on http://%s/metrics (port %d)", metrics_addr, mport);
    }
    while (!ps_server_wait(srv, 200))
        if (got_signal) ps_server_request_stop(srv, got_signal == SIGINT ? "SIGINT" : "SIGTERM");
    cm_info("stopping: %s", ps_server_stop_reason(srv));
    /* Told the run failed: not a success for whoever watches this process. */
    status = ps_server_stop_failed(srv) ? CM_EXIT_FAILED : CM_EXIT_OK;
out:
    cm_http_stop(metrics); /* No scrape reads the server after this. */
    ps_server_destroy(srv, 2000);
    cm_cluster_destroy(cl);
    return status;
}
