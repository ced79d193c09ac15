/* wk_main.c - the pstrain command: parse options, run the trainer.
 * SPDX-License-Identifier: MIT
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_cluster.h"
#include "common/cm_http.h"
#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_status.h"
#include "common/cm_token.h"
#include "ps/ps_optim.h"
#include "worker/device/wk_device_cuda.h"
#include "worker/sync/wk_ring.h"
#include "worker/wk_metrics.h"
#include "worker/wk_trainer.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: pstrain [options]\n"
            "Train an MLP classifier on Fashion-MNIST, or a click-through-rate model\n"
            "(DeepFM, logistic regression) on data in the Criteo format.\n\n"
            "  --model mlp|deepfm|lr     the model (default mlp: Fashion-MNIST; deepfm and\n"
            "                            lr read --data-dir DIR/train.txt and test.txt in\n"
            "                            the Criteo format, e.g. from scripts/make-ctr-data)\n"
            "  --emb-dim K               deepfm: embedding width (default 10)\n"
            "  --hidden W,W,...          deepfm: DNN hidden layers (default 400,400,400;\n"
            "                            0 for none)\n"
            "  --table-optimizer NAME    row-wise optimizer of the embedding tables: adagrad\n"
            "                            | adam (lazy: each row its own step count) | sgd\n"
            "                            (default adagrad)\n"
            "  --table-lr X              its learning rate (default 0.3)\n"
            "  --max-bad-lines N         click data: fail once more than N malformed lines\n"
            "                            were skipped (default 1000)\n"
            "  --mode local|ps|allreduce local: train in this process; ps: a worker of a PS\n"
            "                            cluster; allreduce: a worker of a ring AllReduce\n"
            "                            (no PS; every worker keeps a replica) (default: ps\n"
            "                            when TF_CONFIG or --ps-hosts is given, else local)\n"
            "  --epochs N                passes over the training set (default 10; click\n"
            "                            models 2)\n"
            "  --batch-size N            examples per step and worker (default 128; click\n"
            "                            models 512)\n"
            "  --lr X                    learning rate of the dense variables (default 0.001\n"
            "                            adam, 0.05 sgd/momentum/adagrad; click models with\n"
            "                            adam 0.0001)\n"
            "  --optimizer NAME          sgd | momentum | adam | adagrad (default adam)\n"
            "  --seed N                  initialisation and data order (default 1)\n"
            "  --threads N               BLAS threads (default: all cores with one local\n"
            "                            device, else 1)\n"
            "  --local-devices D         CPU replicas sharing each batch (default 1)\n"
            "  --devices auto|all|cpu|0,1,...  GPUs this worker drives, one replica each\n"
            "                            (default auto: every usable GPU, else the CPU)\n"
            "  --precision fp32|bf16     GPU compute: bf16 GEMM operands, fp32 weights and\n"
            "                            accumulation (default fp32; GPUs only)\n"
            "  --layers W,W,...          mlp: layer widths, input first (default\n"
            "                            784,256,128,10)\n"
            "  --data-dir DIR            mlp: IDX files (default: $PS_DATA_DIR or\n"
            "                            /usr/share/datasets/fashion-mnist); deepfm, lr:\n"
            "                            train.txt and test.txt (default $PS_CTR_DATA)\n"
            "  --train-limit N           use the first N training examples only\n"
            "  --test-limit N            evaluate on the first N test examples only\n"
            "  --max-steps N             stop after N steps\n"
            "  --progress-every SECONDS  progress line interval (default 2; 0 every step)\n"
            "  --metrics-listen H:P      serve Prometheus metrics at http://H:P/metrics: steps,\n"
            "                            examples, the step time and its split, the loss\n"
            "  --quiet                   no progress lines\n"
            "  --summary FILE            write a JSON summary of the run\n"
            "  --log FILE                write one JSON line per step with its time split\n"
            "  --params-out FILE         write the final parameters (raw float32)\n"
            "  --init-out FILE           write the initial parameters (raw float32)\n"
            "  --export FILE             the chief writes the trained model to FILE (the\n"
            "                            model file format of docs/FORMATS.md)\n"
            "  --init-from FILE          start from the parameters in an exported model\n"
            "                            file instead of the seeded initialisation (its\n"
            "                            layers must match --layers; in PS mode the chief\n"
            "                            initialises the shards with them)\n"
            "  --eval-only               evaluate --init-from FILE on the test set and\n"
            "                            exit: no training, no PS (--summary: mode eval)\n"
            "\nPS and allreduce modes (the cluster comes from TF_CONFIG; these flags\n"
            "override it; allreduce: the chief serves the rendezvous at its address):\n"
            "  --ps-hosts H:P,...        PS addresses\n"
            "  --worker-hosts H:P,...    worker addresses\n"
            "  --chief-host H:P          the chief's address (trains as rank 0)\n"
            "  --task-type chief|worker|evaluator  this task's type (an evaluator pulls\n"
            "                            and evaluates every --eval-every versions,\n"
            "                            never pushes, and ends with the PS)\n"
            "  --eval-every N            evaluator: versions between evaluations (500)\n"
            "  --task-index I            this task's index\n"
            "  --sync sync|async|backup  apply steps when all workers pushed (default),\n"
            "                            every push at once, or (backup) when all pushed\n"
            "                            or --worker-timeout passed: then with the workers\n"
            "                            that did (TensorFlow's replicas_to_aggregate)\n"
            "  --min-partition-bytes N   placement's minimum partition (default 262144)\n"
            "  --rpc-timeout-ms N        deadline of every call (default 60000)\n"
            "  --connect-timeout-ms N    how long to retry an unreachable PS (default 30000)\n"
            "  --checkpoint-dir DIR      allreduce: the chief checkpoints its replica there\n"
            "                            and a run started again on it resumes\n"
            "  --checkpoint-every N      allreduce: steps between checkpoints (default: only\n"
            "                            the final one)\n"
            "  --recovery-timeout-ms N   how long to wait for the cluster to roll back after a\n"
            "                            PS restarted from its checkpoint (default 120000)\n"
            "  --worker-timeout S        allreduce: after a worker died, how long the others\n"
            "                            wait for its replacement (default 60); --sync\n"
            "                            backup: how long a step waits (default 10);\n"
            "                            async: how long the chief's final wait for the\n"
            "                            others' last steps waits while none moves on (10)\n"
            "  --min-workers N           allreduce: once that wait ran out, go on in a smaller\n"
            "                            ring if at least N workers are left (default: every\n"
            "                            worker, i.e. the run fails naming the missing ones)\n"
            "  --ring-transport T        allreduce on CPUs: tcp, shm (shared memory between\n"
            "                            workers on one host, or fail) or auto (default:\n"
            "                            shared memory with a neighbour on this host, TCP\n"
            "                            with the others); every worker must use tcp or not\n"
            "  --ring-algorithm A        allreduce on CPUs: ring, hd (halving-doubling: 4, 8,\n"
            "                            16 ... workers over tcp) or auto (default: hd up\n"
            "                            to 4 MiB of gradients where it can run, else ring);\n"
            "                            every worker must ask for hd or none\n"
            "  --max-message-mb N        gRPC message limit with the PS (default 64; a\n"
            "                            shard's parameters travel in one message: raise\n"
            "                            it, and psserver's, for shards larger than that)\n"
            "  --separate-pull           Push, wait, then Pull (two round trips a step)\n"
            "                            instead of one PushPull call per shard\n"
            "  --no-overlap              sync PS mode: push the whole gradient after the\n"
            "                            backward pass instead of each partition as soon\n"
            "                            as it is computed\n"
            "  --no-pipeline             sync PS mode with overlap: wait for the whole new\n"
            "                            version at the end of a step instead of letting the\n"
            "                            next forward pass wait for each piece of the first\n"
            "                            layer's kernel as it needs it\n"
            "  --call-bytes N            PS mode: a shard's share of a dense push or pull\n"
            "                            of more than N bytes goes as several calls\n"
            "                            (whole partitions, at most 16; default 524288;\n"
            "                            -1: one call a shard)\n"
            "  --call-window N           PS mode: of a shard's calls, N in flight at once;\n"
            "                            each end starts the next (default 3; -1: all at\n"
            "                            once). A call's pull waits for every worker's\n"
            "                            push of it: fewer at once keep the workers' calls\n"
            "                            in step\n"
            "  --client-spin-us N        PS mode: a thread waiting for the PS first polls\n"
            "                            for up to N µs, yielding its core, before it\n"
            "                            sleeps: no wake-up for a reply that comes\n"
            "                            meanwhile. Takes a core while it waits: for\n"
            "                            machines with one to spare (default 0: off)\n"
            "  --poll-spin-us N          PS mode: the gRPC client's thread polls this long,\n"
            "                            yielding its core, before it sleeps (default 50;\n"
            "                            -1: sleep at once)\n"
            "  --unary-calls             PS mode: every push and pull a gRPC call of its\n"
            "                            own, instead of messages on one gRPC stream a\n"
            "                            shard and method (the default: no per-call work\n"
            "                            in gRPC, 1.5x the small calls a second)\n"
            "  --wire-dtype fp32|bf16    PS mode: push gradients as float32 (default) or\n"
            "                            bfloat16 (rounded to nearest even: half the bytes\n"
            "                            pushed; pulls, the PS's sums, optimizer and\n"
            "                            weights stay fp32; any device, the CPU too)\n"
            "  --no-nccl                 allreduce mode on GPUs: average over the TCP ring,\n"
            "                            not NCCL (e.g. workers sharing one GPU, which\n"
            "                            NCCL refuses); every worker must agree\n"
            "\nScaling experiments (scripts/experiments/scaling.sh):\n"
            "  --devices sim[:N]         N (default 1) simulated devices: each step's\n"
            "                            gradient takes the time below, asleep, and is a\n"
            "                            fixed pattern of the model's size (everything after\n"
            "                            it is real); the accuracy means nothing\n"
            "  --sim-tflops X            a device's speed: the model's FLOPs on its slice\n"
            "                            of the batch take FLOPs / X e12 seconds; or\n"
            "  --sim-step-ms X           every gradient takes X ms\n"
            "  --sim-jitter F            each gradient takes that time x (1 +- up to F),\n"
            "                            drawn per worker and step (0 <= F < 1; default 0:\n"
            "                            exactly)\n"
            "  --sim-intra-gbps X        GB/s between a worker's devices: the local reduce\n"
            "                            takes 2(N-1)/N of the gradient over that (default:\n"
            "                            free)\n"
            "  --sim-input-ms X          preparing a batch takes at least X ms\n"
            "  --no-prefetch             gather each batch when the step asks for it,\n"
            "                            instead of ahead of it on a reader thread\n"
            "  --model-mb X              mlp: 784,H,H,10 with H making about X MB of\n"
            "                            parameters\n"
            "\n"
            "  --devices staged          test hook: --local-devices CPU replicas driven as\n"
            "                            GPUs are (uploads, downloads, host reduce)\n"
            "  --fault zero-gradient     test hook: push zeros instead of the gradient\n"
            "  --fault-rank R            ...on rank R only (default: every rank)\n"
            "\nSecurity (PS and allreduce modes; see the README's \"Security model\"):\n"
            "  --auth-token-file F       send the token in F (first line) with every call;\n"
            "                            the PS (and the chief's rendezvous) refuse calls\n"
            "                            without it\n"
            "  --admin-token-file F      the chief: the token for Initialize, Rollback and\n"
            "                            Shutdown (the PS's --admin-token-file)\n"
            "  --tls-ca F                use TLS, trusting servers signed by this CA (PEM)\n"
            "  --tls-cert F --tls-key F  this task's certificate and key (PEM): for mutual\n"
            "                            TLS, and the chief's rendezvous serves TLS with them\n"
            "  --tls-server-name NAME    the name on the servers' certificates, when it is\n"
            "                            not the host in their addresses\n"
            "  -h, --help                this text\n");
}

static int parse_long(const char *opt, const char *s, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "pstrain: %s needs an integer in %ld..%ld, got '%s'\n", opt, lo, hi, s);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_double(const char *opt, const char *s, double lo, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo)) {
        fprintf(stderr, "pstrain: %s needs a number >= %g, got '%s'\n", opt, lo, s);
        return -1;
    }
    *out = v;
    return 0;
}

/* What the command line says beyond wk_train_cfg: the cluster flags and
 * the credentials (cfg.sec points at sec when there are any). */
typedef struct cli {
    const char *lists[CM_TASK_NTYPES];
    const char *metrics_addr; /* --metrics-listen */
    int task_type, task_index, mode_given;
    cm_security sec;
} cli;

/* Click models' defaults for what the command line did not say: 2 epochs
 * of 512 examples a worker (the planted data set's 2 M rows; measured in
 * docs/bench-log.md, "DeepFM"), where the MLP has 10 of 128. */
enum { CTR_EPOCHS = 2, CTR_BATCH = 512 };

/* "400,400,400" (or "0": none) into cfg's hidden layers; -1 if bad. */
static int parse_hidden(const char *s, wk_train_cfg *cfg) {
    if (!strcmp(s, "0")) {
        cfg->nhidden = 0;
        return 0;
    }
    int n = 0;
    for (const char *p = s;;) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (errno || end == p || v < 1 || v > 1 << 16 || n >= CM_MLP_MAX_SIZES - 2) return -1;
        cfg->hidden[n++] = (int)v;
        if (*end == '\0') break;
        if (*end != ',') return -1;
        p = end + 1;
    }
    cfg->nhidden = n;
    return 0;
}

/* Options into cfg and c. Returns -1 to go on, else the exit status
 * (0 after --help, 2 for a bad option, with a message). */
static int parse_args(int argc, char **argv, wk_train_cfg *cfg_out, cli *cl) {
    enum {
        O_MODE = 256, O_EPOCHS, O_BATCH, O_LR, O_OPT, O_SEED, O_THREADS, O_DEVICES, O_LAYERS,
        O_DATA, O_TRAIN_LIMIT, O_TEST_LIMIT, O_MAX_STEPS, O_PROGRESS, O_QUIET, O_SUMMARY, O_LOG,
        O_PARAMS_OUT, O_INIT_OUT, O_PS_HOSTS, O_WORKER_HOSTS, O_CHIEF_HOST, O_TASK_TYPE, O_TASK_INDEX,
        O_AUTH_TOKEN, O_ADMIN_TOKEN, O_TLS_CA, O_TLS_CERT, O_TLS_KEY, O_TLS_NAME,
        O_SYNC, O_MIN_PART, O_CALL_BYTES, O_CALL_WINDOW, O_CLIENT_SPIN, O_RPC_TIMEOUT, O_CONNECT_TIMEOUT, O_FAULT, O_FAULT_RANK, O_SEPARATE_PULL, O_NO_OVERLAP, O_NO_PIPELINE, O_UNARY_CALLS, O_POLL_SPIN, O_EVAL_EVERY,
        O_RECOVERY_TIMEOUT, O_WORKER_TIMEOUT, O_MIN_WORKERS, O_EXPORT, O_INIT_FROM, O_EVAL_ONLY, O_CKPT_DIR, O_CKPT_EVERY,
        O_GPU_DEVICES, O_PRECISION, O_NO_NCCL, O_WIRE_DTYPE, O_MODEL, O_EMB_DIM, O_HIDDEN,
        O_TABLE_OPT, O_TABLE_LR, O_MAX_BAD, O_RING_TRANSPORT, O_RING_ALGORITHM, O_SIM_TFLOPS, O_SIM_STEP_MS,
        O_SIM_INTRA, O_SIM_JITTER, O_SIM_INPUT, O_NO_PREFETCH, O_MODEL_MB, O_MAX_MESSAGE, O_METRICS
    };
    static const struct option opts[] = {
        {"mode", required_argument, 0, O_MODE},
        {"model", required_argument, 0, O_MODEL},
        {"emb-dim", required_argument, 0, O_EMB_DIM},
        {"hidden", required_argument, 0, O_HIDDEN},
        {"table-optimizer", required_argument, 0, O_TABLE_OPT},
        {"table-lr", required_argument, 0, O_TABLE_LR},
        {"max-bad-lines", required_argument, 0, O_MAX_BAD},
        {"checkpoint-dir", required_argument, 0, O_CKPT_DIR},
        {"checkpoint-every", required_argument, 0, O_CKPT_EVERY},
        {"epochs", required_argument, 0, O_EPOCHS},
        {"batch-size", required_argument, 0, O_BATCH},
        {"lr", required_argument, 0, O_LR},
        {"optimizer", required_argument, 0, O_OPT},
        {"seed", required_argument, 0, O_SEED},
        {"threads", required_argument, 0, O_THREADS},
        {"local-devices", required_argument, 0, O_DEVICES},
        {"layers", required_argument, 0, O_LAYERS},
        {"model-mb", required_argument, 0, O_MODEL_MB},
        {"max-message-mb", required_argument, 0, O_MAX_MESSAGE},
        {"metrics-listen", required_argument, 0, O_METRICS},
        {"sim-tflops", required_argument, 0, O_SIM_TFLOPS},
        {"sim-step-ms", required_argument, 0, O_SIM_STEP_MS},
        {"sim-intra-gbps", required_argument, 0, O_SIM_INTRA},
        {"sim-jitter", required_argument, 0, O_SIM_JITTER},
        {"sim-input-ms", required_argument, 0, O_SIM_INPUT},
        {"no-prefetch", no_argument, 0, O_NO_PREFETCH},
        {"data-dir", required_argument, 0, O_DATA},
        {"train-limit", required_argument, 0, O_TRAIN_LIMIT},
        {"test-limit", required_argument, 0, O_TEST_LIMIT},
        {"max-steps", required_argument, 0, O_MAX_STEPS},
        {"progress-every", required_argument, 0, O_PROGRESS},
        {"quiet", no_argument, 0, O_QUIET},
        {"summary", required_argument, 0, O_SUMMARY},
        {"log", required_argument, 0, O_LOG},
        {"params-out", required_argument, 0, O_PARAMS_OUT},
        {"init-out", required_argument, 0, O_INIT_OUT},
        {"ps-hosts", required_argument, 0, O_PS_HOSTS},
        {"worker-hosts", required_argument, 0, O_WORKER_HOSTS},
        {"chief-host", required_argument, 0, O_CHIEF_HOST},
        {"task-type", required_argument, 0, O_TASK_TYPE},
        {"task-index", required_argument, 0, O_TASK_INDEX},
        {"sync", required_argument, 0, O_SYNC},
        {"min-partition-bytes", required_argument, 0, O_MIN_PART},
        {"call-bytes", required_argument, 0, O_CALL_BYTES},
        {"call-window", required_argument, 0, O_CALL_WINDOW},
        {"client-spin-us", required_argument, 0, O_CLIENT_SPIN},
        {"rpc-timeout-ms", required_argument, 0, O_RPC_TIMEOUT},
        {"connect-timeout-ms", required_argument, 0, O_CONNECT_TIMEOUT},
        {"recovery-timeout-ms", required_argument, 0, O_RECOVERY_TIMEOUT},
        {"worker-timeout", required_argument, 0, O_WORKER_TIMEOUT},
        {"min-workers", required_argument, 0, O_MIN_WORKERS},
        {"ring-transport", required_argument, 0, O_RING_TRANSPORT},
        {"ring-algorithm", required_argument, 0, O_RING_ALGORITHM},
        {"fault", required_argument, 0, O_FAULT},
        {"fault-rank", required_argument, 0, O_FAULT_RANK},
        {"separate-pull", no_argument, 0, O_SEPARATE_PULL},
        {"no-overlap", no_argument, 0, O_NO_OVERLAP},
        {"no-pipeline", no_argument, 0, O_NO_PIPELINE},
        {"unary-calls", no_argument, 0, O_UNARY_CALLS},
        {"poll-spin-us", required_argument, 0, O_POLL_SPIN},
        {"no-nccl", no_argument, 0, O_NO_NCCL},
        {"eval-every", required_argument, 0, O_EVAL_EVERY},
        {"export", required_argument, 0, O_EXPORT},
        {"init-from", required_argument, 0, O_INIT_FROM},
        {"eval-only", no_argument, 0, O_EVAL_ONLY},
        {"devices", required_argument, 0, O_GPU_DEVICES},
        {"precision", required_argument, 0, O_PRECISION},
        {"wire-dtype", required_argument, 0, O_WIRE_DTYPE},
        {"auth-token-file", required_argument, 0, O_AUTH_TOKEN},
        {"admin-token-file", required_argument, 0, O_ADMIN_TOKEN},
        {"tls-ca", required_argument, 0, O_TLS_CA},
        {"tls-cert", required_argument, 0, O_TLS_CERT},
        {"tls-key", required_argument, 0, O_TLS_KEY},
        {"tls-server-name", required_argument, 0, O_TLS_NAME},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    wk_train_cfg cfg;
    wk_train_cfg_defaults(&cfg);
    int c;
    long v;
    double dv;
    const char **lists = cl->lists;
    int task_type = -1, task_index = -1, mode_given = 0, epochs_given = 0, batch_given = 0;
    const char *auth_file = NULL, *admin_file = NULL;
    cm_security sec = {0};
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        epochs_given |= c == O_EPOCHS;
        batch_given |= c == O_BATCH;
        switch (c) {
        case O_MODEL:
            if (strcmp(optarg, "mlp") && strcmp(optarg, "deepfm") && strcmp(optarg, "lr")) {
                fprintf(stderr, "pstrain: --model must be mlp, deepfm or lr, got '%s'\n", optarg);
                return 2;
            }
            cfg.model = optarg;
            break;
        case O_EMB_DIM:
            if (parse_long("--emb-dim", optarg, 1, 4096, &v)) return 2;
            cfg.emb_dim = (int)v;
            break;
        case O_HIDDEN:
            if (parse_hidden(optarg, &cfg)) {
                fprintf(stderr, "pstrain: --hidden needs up to %d positive widths like "
                                "400,400,400 (or 0), got '%s'\n", CM_MLP_MAX_SIZES - 2, optarg);
                return 2;
            }
            break;
        case O_TABLE_OPT: {
            int k = ps_optim_parse(optarg);
            if (k != PS_OPTIM_ADAGRAD && k != PS_OPTIM_ADAM && k != PS_OPTIM_SGD) {
                fprintf(stderr, "pstrain: --table-optimizer must be adagrad, adam or sgd, got "
                                "'%s'\n", optarg);
                return 2;
            }
            cfg.table_optimizer = k;
            break;
        }
        case O_TABLE_LR:
            if (parse_double("--table-lr", optarg, 1e-12, &dv)) return 2;
            cfg.table_lr = (float)dv;
            break;
        case O_MAX_BAD:
            if (parse_long("--max-bad-lines", optarg, 0, 1L << 40, &v)) return 2;
            cfg.max_bad_lines = (uint64_t)v;
            break;
        case O_MODE:
            if (strcmp(optarg, "local") && strcmp(optarg, "ps") && strcmp(optarg, "allreduce")) {
                fprintf(stderr, "pstrain: --mode must be local, ps or allreduce, got '%s'\n",
                        optarg);
                return 2;
            }
            cfg.mode = optarg;
            mode_given = 1;
            break;
        case O_EPOCHS:
            if (parse_long("--epochs", optarg, 1, 100000, &v)) return 2;
            cfg.epochs = (int)v;
            break;
        case O_BATCH:
            if (parse_long("--batch-size", optarg, 1, 1 << 20, &v)) return 2;
            cfg.batch_size = (int)v;
            break;
        case O_LR:
            if (parse_double("--lr", optarg, 1e-12, &dv)) return 2;
            cfg.lr = (float)dv;
            break;
        case O_OPT:
            if ((cfg.optimizer = ps_optim_parse(optarg)) < 0) {
                fprintf(stderr,
                        "pstrain: --optimizer must be sgd, momentum, adam or adagrad, got '%s'\n",
                        optarg);
                return 2;
            }
            break;
        case O_SEED:
            if (parse_long("--seed", optarg, 0, 0x7fffffffffffffffL, &v)) return 2;
            cfg.seed = (uint64_t)v;
            break;
        case O_THREADS:
            if (parse_long("--threads", optarg, 1, 256, &v)) return 2;
            cfg.threads = (int)v;
            break;
        case O_DEVICES:
            if (parse_long("--local-devices", optarg, 1, 64, &v)) return 2;
            cfg.local_devices = (int)v;
            break;
        case O_LAYERS: {
            int n = cm_parse_sizes(optarg, cfg.sizes, CM_MLP_MAX_SIZES);
            if (n < 0) {
                fprintf(stderr,
                        "pstrain: --layers needs 2 to %d positive widths like 784,256,128,10, "
                        "got '%s'\n",
                        CM_MLP_MAX_SIZES, optarg);
                return 2;
            }
            cfg.nsizes = n;
            break;
        }
        case O_MODEL_MB: {
            /* An MLP of about X MB: 784 -> H -> H -> 10, H from
             * H^2 + 796 H + 10 = X * 1e6 / 4 (the widths it gets are
             * logged with the parameter count). */
            if (parse_double("--model-mb", optarg, 0.1, &dv) || dv > 4000) {
                if (dv > 4000) fprintf(stderr, "pstrain: --model-mb is at most 4000\n");
                return 2;
            }
            double p = dv * 1e6 / 4.0, h = (-796.0 + sqrt(796.0 * 796.0 + 4.0 * (p - 10))) / 2;
            int w = h < 1 ? 1 : (int)(h + 0.5);
            int sizes[4] = {784, w, w, 10};
            memcpy(cfg.sizes, sizes, sizeof sizes);
            cfg.nsizes = 4;
            break;
        }
        case O_SIM_TFLOPS:
            if (parse_double("--sim-tflops", optarg, 1e-6, &dv)) return 2;
            cfg.sim.tflops = dv;
            break;
        case O_SIM_STEP_MS:
            if (parse_double("--sim-step-ms", optarg, 1e-3, &dv)) return 2;
            cfg.sim.step_ms = dv;
            break;
        case O_SIM_INTRA:
            if (parse_double("--sim-intra-gbps", optarg, 1e-3, &dv)) return 2;
            cfg.sim.intra_gbps = dv;
            break;
        case O_SIM_JITTER:
            if (parse_double("--sim-jitter", optarg, 0.0, &dv)) return 2;
            if (dv >= 1) {
                fprintf(stderr, "pstrain: --sim-jitter needs a fraction below 1, got '%s'\n",
                        optarg);
                return 2;
            }
            cfg.sim.jitter = dv;
            break;
        case O_SIM_INPUT:
            if (parse_double("--sim-input-ms", optarg, 0.0, &dv)) return 2;
            cfg.sim_input_s = dv * 1e-3;
            break;
        case O_NO_PREFETCH: cfg.no_prefetch = 1; break;
        case O_METRICS: cl->metrics_addr = optarg; break;
        case O_MAX_MESSAGE:
            if (parse_long("--max-message-mb", optarg, 1, 2047, &v)) return 2;
            cfg.max_message_mb = (int)v;
            break;
        case O_DATA: cfg.data_dir = optarg; break;
        case O_TRAIN_LIMIT:
            if (parse_long("--train-limit", optarg, 1, 1L << 40, &v)) return 2;
            cfg.train_limit = (size_t)v;
            break;
        case O_TEST_LIMIT:
            if (parse_long("--test-limit", optarg, 1, 1L << 40, &v)) return 2;
            cfg.test_limit = (size_t)v;
            break;
        case O_MAX_STEPS:
            if (parse_long("--max-steps", optarg, 1, 1L << 40, &v)) return 2;
            cfg.max_steps = v;
            break;
        case O_PROGRESS:
            if (parse_double("--progress-every", optarg, 0.0, &dv)) return 2;
            cfg.progress_every = dv;
            break;
        case O_QUIET: cfg.progress_every = -1.0; break;
        case O_SUMMARY: cfg.summary_path = optarg; break;
        case O_LOG: cfg.log_path = optarg; break;
        case O_PARAMS_OUT: cfg.params_out = optarg; break;
        case O_INIT_OUT: cfg.init_out = optarg; break;
        case O_EXPORT: cfg.export_path = optarg; break;
        case O_INIT_FROM: cfg.init_from = optarg; break;
        case O_EVAL_ONLY: cfg.eval_only = 1; break;
        case O_PS_HOSTS: lists[CM_TASK_PS] = optarg; break;
        case O_WORKER_HOSTS: lists[CM_TASK_WORKER] = optarg; break;
        case O_CHIEF_HOST: lists[CM_TASK_CHIEF] = optarg; break;
        case O_TASK_TYPE:
            task_type = cm_task_type_parse(optarg);
            if (task_type != CM_TASK_CHIEF && task_type != CM_TASK_WORKER &&
                task_type != CM_TASK_EVALUATOR) {
                fprintf(stderr,
                        "pstrain: --task-type must be chief, worker or evaluator, got '%s'\n",
                        optarg);
                return 2;
            }
            break;
        case O_TASK_INDEX:
            if (parse_long("--task-index", optarg, 0, 1 << 20, &v)) return 2;
            task_index = (int)v;
            break;
        case O_SYNC:
            if (strcmp(optarg, "sync") && strcmp(optarg, "async") && strcmp(optarg, "backup")) {
                fprintf(stderr, "pstrain: --sync must be sync, async or backup, got '%s'\n",
                        optarg);
                return 2;
            }
            cfg.async = !strcmp(optarg, "async");
            cfg.backup_sync = !strcmp(optarg, "backup");
            break;
        case O_MIN_PART:
            if (parse_long("--min-partition-bytes", optarg, 1, 1L << 40, &v)) return 2;
            cfg.min_part_bytes = (size_t)v;
            break;
        case O_CALL_BYTES:
            if (parse_long("--call-bytes", optarg, -1, 1L << 40, &v)) return 2;
            cfg.call_bytes = v;
            break;
        case O_CALL_WINDOW:
            if (parse_long("--call-window", optarg, -1, 1024, &v)) return 2;
            if (v == 0) {
                fprintf(stderr, "pstrain: --call-window needs 1 or more, or -1 (all at once)\n");
                return 2;
            }
            cfg.call_window = (int)v;
            break;
        case O_CLIENT_SPIN:
            if (parse_long("--client-spin-us", optarg, 0, 1000000, &v)) return 2;
            cfg.client_spin_us = (int)v;
            break;
        case O_RPC_TIMEOUT:
            if (parse_long("--rpc-timeout-ms", optarg, 1, 1L << 40, &v)) return 2;
            cfg.deadline_ms = v;
            break;
        case O_CONNECT_TIMEOUT:
            if (parse_long("--connect-timeout-ms", optarg, 1, 1L << 40, &v)) return 2;
            cfg.connect_timeout_ms = v;
            break;
        case O_WORKER_TIMEOUT:
            if (parse_double("--worker-timeout", optarg, 0.001, &dv)) return 2;
            cfg.worker_timeout_ms = (int64_t)(dv * 1e3);
            break;
        case O_RING_TRANSPORT:
            if (!strcmp(optarg, "tcp")) {
                cfg.ring_transport = WK_RING_TCP;
            } else if (!strcmp(optarg, "shm")) {
                cfg.ring_transport = WK_RING_SHM;
            } else if (!strcmp(optarg, "auto")) {
                cfg.ring_transport = WK_RING_AUTO;
            } else {
                fprintf(stderr, "pstrain: --ring-transport: tcp, shm or auto, not '%s'\n",
                        optarg);
                return 2;
            }
            break;
        case O_RING_ALGORITHM:
            if (!strcmp(optarg, "ring")) {
                cfg.ring_algorithm = WK_RING_ALG_RING;
            } else if (!strcmp(optarg, "hd")) {
                cfg.ring_algorithm = WK_RING_ALG_HD;
            } else if (!strcmp(optarg, "auto")) {
                cfg.ring_algorithm = WK_RING_ALG_AUTO;
            } else {
                fprintf(stderr, "pstrain: --ring-algorithm: ring, hd or auto, not '%s'\n",
                        optarg);
                return 2;
            }
            break;
        case O_MIN_WORKERS:
            if (parse_long("--min-workers", optarg, 1, 1 << 20, &v)) return 2;
            cfg.min_workers = (int)v;
            break;
        case O_RECOVERY_TIMEOUT:
            if (parse_long("--recovery-timeout-ms", optarg, 1, 1L << 40, &v)) return 2;
            cfg.recovery_timeout_ms = v;
            break;
        case O_CKPT_DIR: cfg.checkpoint_dir = optarg; break;
        case O_AUTH_TOKEN: auth_file = optarg; break;
        case O_ADMIN_TOKEN: admin_file = optarg; break;
        case O_TLS_CA: sec.tls_ca = optarg; break;
        case O_TLS_CERT: sec.tls_cert = optarg; break;
        case O_TLS_KEY: sec.tls_key = optarg; break;
        case O_TLS_NAME: sec.tls_server_name = optarg; break;
        case O_CKPT_EVERY:
            if (parse_long("--checkpoint-every", optarg, 0, 1L << 40, &v)) return 2;
            cfg.checkpoint_every = v;
            break;
        case O_FAULT:
            if (strcmp(optarg, "zero-gradient")) {
                fprintf(stderr, "pstrain: --fault must be zero-gradient, got '%s'\n", optarg);
                return 2;
            }
            cfg.fault_zero_gradient = 1;
            break;
        case O_SEPARATE_PULL: cfg.separate_pull = 1; break;
        case O_NO_OVERLAP: cfg.no_overlap = 1; break;
        case O_NO_PIPELINE: cfg.no_pipeline = 1; break;
        case O_UNARY_CALLS: cfg.unary_calls = 1; break;
        case O_POLL_SPIN:
            if (parse_long("--poll-spin-us", optarg, -1, 1000000, &v)) return 2;
            cfg.poll_spin_us = (int)v;
            break;
        case O_NO_NCCL: cfg.no_nccl = 1; break;
        case O_EVAL_EVERY:
            if (parse_long("--eval-every", optarg, 1, 1L << 40, &v)) return 2;
            cfg.eval_every = v;
            break;
        case O_FAULT_RANK:
            if (parse_long("--fault-rank", optarg, 0, 1 << 20, &v)) return 2;
            cfg.fault_rank = (int)v;
            break;
        case O_GPU_DEVICES: cfg.devices = optarg; break;
        case O_PRECISION:
            if ((cfg.precision = wk_precision_parse(optarg)) < 0) {
                fprintf(stderr, "pstrain: --precision must be fp32 or bf16, got '%s'\n", optarg);
                return 2;
            }
            break;
        case O_WIRE_DTYPE:
            if (strcmp(optarg, "fp32") && strcmp(optarg, "bf16")) {
                fprintf(stderr, "pstrain: --wire-dtype must be fp32 or bf16, got '%s'\n", optarg);
                return 2;
            }
            cfg.wire_bf16 = !strcmp(optarg, "bf16");
            break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "pstrain: unexpected argument '%s' (see --help)\n", argv[optind]);
        return 2;
    }
    if (!sec.tls_cert != !sec.tls_key) {
        fprintf(stderr, "pstrain: --tls-cert and --tls-key go together\n");
        return 2;
    }
    if ((sec.tls_cert || sec.tls_server_name) && !sec.tls_ca) {
        fprintf(stderr, "pstrain: --tls-cert and --tls-server-name need --tls-ca (the CA "
                        "that signed the servers' certificates)\n");
        return 2;
    }
    char terr[600];
    if (cm_security_load(&sec, auth_file, admin_file, terr, sizeof terr) != CM_OK) {
        fprintf(stderr, "pstrain: %s\n", terr);
        return 2;
    }
    if (cfg.optimizer == PS_OPTIM_ADD) {
        fprintf(stderr, "pstrain: --optimizer must be sgd, momentum, adam or adagrad\n");
        return 2;
    }
    if (wk_train_simulated(&cfg)) {
        if (wk_train_sim_devices(&cfg) < 1) {
            fprintf(stderr, "pstrain: --devices sim:N needs N in 1..64, got '%s'\n", cfg.devices);
            return 2;
        }
        if ((cfg.sim.tflops > 0) == (cfg.sim.step_ms > 0)) {
            fprintf(stderr, "pstrain: --devices sim needs one of --sim-tflops X or "
                            "--sim-step-ms X\n");
            return 2;
        }
    } else if (cfg.sim.tflops > 0 || cfg.sim.step_ms > 0 || cfg.sim.intra_gbps > 0 ||
               cfg.sim.jitter > 0) {
        fprintf(stderr, "pstrain: --sim-tflops, --sim-step-ms, --sim-intra-gbps and "
                        "--sim-jitter go with --devices sim\n");
        return 2;
    }
    if (cfg.eval_only && !cfg.init_from) {
        fprintf(stderr, "pstrain: --eval-only needs --init-from FILE\n");
        return 2;
    }
    if (strcmp(cfg.model, "mlp") != 0) {
        if (!epochs_given) cfg.epochs = CTR_EPOCHS;
        if (!batch_given) cfg.batch_size = CTR_BATCH;
    }
    cl->task_type = task_type;
    cl->task_index = task_index;
    cl->mode_given = mode_given;
    cl->sec = sec;
    *cfg_out = cfg;
    return -1;
}

/* The cluster: TF_CONFIG, then the flags on top; sets cfg->mode to ps when
 * a cluster is given without --mode, and the log tag. *out NULL when the
 * run needs none. Returns 0, or 2 after a message. */
static int load_cluster(const cli *cl, wk_train_cfg *cfg, cm_cluster **out) {
    const char *const *lists = cl->lists;
    int task_type = cl->task_type, task_index = cl->task_index;
    char err[512];
    cm_cluster *cluster = NULL;
    *out = NULL;
    int rc = cm_cluster_from_env(&cluster, err, sizeof err);
    int have_cluster = rc == CM_OK || lists[CM_TASK_PS];
    if (rc != CM_OK && rc != CM_ENOTFOUND) {
        fprintf(stderr, "pstrain: %s\n", err);
        cm_cluster_destroy(cluster);
        return 2;
    }
    for (int t = 0; t < CM_TASK_NTYPES; t++)
        if (lists[t] && cm_cluster_set_list(cluster, t, lists[t], err, sizeof err) != CM_OK) {
            fprintf(stderr, "pstrain: %s\n", err);
            cm_cluster_destroy(cluster);
            return 2;
        }
    if (task_type >= 0 || task_index >= 0)
        cm_cluster_set_task(cluster, task_type >= 0 ? task_type : cluster->task_type,
                            task_index >= 0 ? task_index : 0);
    if (!cl->mode_given && have_cluster) cfg->mode = "ps";
    if ((!strcmp(cfg->mode, "ps") || !strcmp(cfg->mode, "allreduce")) && !cfg->eval_only) {
        if (cluster->task_type < 0) /* --task-index alone: a worker. */
            cm_cluster_set_task(cluster, CM_TASK_WORKER,
                                cluster->task_index >= 0 ? cluster->task_index : 0);
        if (cm_cluster_validate(cluster, err, sizeof err) != CM_OK) {
            fprintf(stderr, "pstrain: %s\n", err);
            cm_cluster_destroy(cluster);
            return 2;
        }
        char tag[32];
        snprintf(tag, sizeof tag, "%s %d", cm_task_type_name(cluster->task_type),
                 cluster->task_index);
        cm_log_set_tag(tag);
        cfg->cluster = cluster;
    }
    *out = cluster;
    return 0;
}

/* The last line of the run on stdout. */
static void print_result(const wk_train_cfg *cfg, const wk_train_result *res) {
    const wk_train_result r = *res;
    int ctr = !isnan(r.test_auc);
    char bayes[64] = "";
    if (ctr && !isnan(r.bayes_auc))
        snprintf(bayes, sizeof bayes, " (Bayes optimum %.4f)", r.bayes_auc);
    if (cfg->eval_only) {
        if (ctr)
            printf("test auc %.4f%s logloss %.4f on %zu test examples of the model in %s (%lld "
                   "steps)\n",
                   r.test_auc, bayes, r.test_loss, r.test_examples, cfg->init_from,
                   (long long)r.steps);
        else
            printf("test accuracy %.4f (loss %.4f) on %zu test images of the model in %s (%lld "
                   "steps)\n",
                   r.test_accuracy, r.test_loss, r.test_examples, cfg->init_from,
                   (long long)r.steps);
        return;
    }
    if (r.rank < 0) {
        printf("evaluator: last evaluation at version %lld: test accuracy %.4f (loss %.4f) on %zu "
               "test images\n",
               (long long)r.steps, r.test_accuracy, r.test_loss, r.test_examples);
        return;
    }
    if (!strcmp(cfg->mode, "allreduce")) /* Every replica says what it holds. */
        printf("replica of rank %d: parameters checksum %016llx\n", r.rank,
               (unsigned long long)r.params_checksum);
    if (!r.is_chief) {
        printf("worker rank %d of %d finished %lld steps in %.1f s (%.0f examples/s overall)\n",
               r.rank, r.workers, (long long)r.steps, r.seconds, r.examples_per_sec);
        return;
    }
    if (wk_train_simulated(cfg))
        printf("simulated devices (--devices %s): %lld steps in %.1f s (%.0f examples/s, %.0f "
               "steady); no accuracy: the gradients are a fixed pattern\n",
               cfg->devices, (long long)r.steps, r.seconds, r.examples_per_sec,
               r.steady_examples_per_sec);
    else if (ctr)
        printf("test auc %.4f%s logloss %.4f accuracy %.4f on %zu test examples after %lld steps "
               "in %.1f s (%.0f examples/s, %.0f unique rows a batch)\n",
               r.test_auc, bayes, r.test_loss, r.test_accuracy, r.test_examples,
               (long long)r.steps, r.seconds, r.examples_per_sec, r.unique_ids_per_batch);
    else
        printf("test accuracy %.4f (loss %.4f) on %zu test images after %lld steps in %.1f s "
               "(%.0f examples/s)\n",
               r.test_accuracy, r.test_loss, r.test_examples, (long long)r.steps, r.seconds,
               r.examples_per_sec);
}

static char *render_metrics(void *ud, size_t *len) { return wk_metrics_render(ud, len); }

int main(int argc, char **argv) {
    cm_mem_keep_freed();
    wk_train_cfg cfg;
    cli cl = {.task_type = -1, .task_index = -1};
    int rc = parse_args(argc, argv, &cfg, &cl);
    if (rc >= 0) return rc;
    if (cl.sec.token[0] || cl.sec.admin_token[0] || cl.sec.tls_ca) cfg.sec = &cl.sec;
    cm_cluster *cluster = NULL;
    if ((rc = load_cluster(&cl, &cfg, &cluster)) != 0) return rc;
    wk_train_result r;
    cfg.report = print_result; /* The last line, before the cluster is let go. */
    static wk_metrics metrics;
    cm_http *http = NULL;
    if (cl.metrics_addr) {
        char err[256];
        int port = 0;
        rc = cm_http_start(cl.metrics_addr, render_metrics, &metrics, &http, &port, err,
                           sizeof err);
        if (rc != CM_OK) {
            fprintf(stderr, "pstrain: --metrics-listen: %s\n", err);
            cm_cluster_destroy(cluster);
            return rc == CM_EBUSY ? CM_EXIT_PORT : CM_EXIT_CONFIG;
        }
        cm_info("metrics on http://%s/metrics (port %d)", cl.metrics_addr, port);
        cfg.metrics = &metrics;
    }
    int status = wk_train_run(&cfg, &r);
    cm_http_stop(http);
    cm_cluster_destroy(cluster);
    if (status == CM_ESHUTDOWN && r.run_ended) return 0;
    if (status != CM_OK) {
        fprintf(stderr, "pstrain: failed: %s\n", cm_strerror(status));
        /* CM_EBUSY comes only from a listener that could not bind (the
         * chief's rendezvous address: taken, or, which gRPC does not tell
         * apart, not local): a supervisor may pick new ports. */
        return status == CM_EBUSY ? CM_EXIT_PORT : CM_EXIT_FAILED;
    }
    if (!r.reported) print_result(&cfg, &r);
    return 0;
}
