/* wk_main.c - the pstrain command: parse options, run the trainer.
 * SPDX-License-Identifier: MIT
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_log.h"
#include "common/cm_status.h"
#include "ps/ps_optim.h"
#include "worker/wk_trainer.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: pstrain [options]\n"
            "Train an MLP classifier on Fashion-MNIST.\n\n"
            "  --mode local              train in this process (default: local)\n"
            "  --epochs N                passes over the training set (default 10)\n"
            "  --batch-size N            examples per step (default 128)\n"
            "  --lr X                    learning rate (default 0.001 adam, 0.05 sgd/momentum)\n"
            "  --optimizer NAME          sgd | momentum | adam (default adam)\n"
            "  --seed N                  initialisation and data order (default 1)\n"
            "  --threads N               BLAS threads (default: all cores with one local\n"
            "                            device, else 1)\n"
            "  --local-devices D         CPU replicas sharing each batch (default 1)\n"
            "  --layers W,W,...          layer widths, input first (default 784,256,128,10)\n"
            "  --data-dir DIR            IDX files (default: $PS_DATA_DIR or\n"
            "                            /usr/share/datasets/fashion-mnist)\n"
            "  --train-limit N           use the first N training examples only\n"
            "  --test-limit N            evaluate on the first N test examples only\n"
            "  --max-steps N             stop after N steps\n"
            "  --progress-every SECONDS  progress line interval (default 2; 0 every step)\n"
            "  --quiet                   no progress lines\n"
            "  --summary FILE            write a JSON summary of the run\n"
            "  --log FILE                write one JSON line per step with its time split\n"
            "  --params-out FILE         write the final parameters (raw float32)\n"
            "  --init-out FILE           write the initial parameters (raw float32)\n"
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

int main(int argc, char **argv) {
    enum {
        O_MODE = 256, O_EPOCHS, O_BATCH, O_LR, O_OPT, O_SEED, O_THREADS, O_DEVICES, O_LAYERS,
        O_DATA, O_TRAIN_LIMIT, O_TEST_LIMIT, O_MAX_STEPS, O_PROGRESS, O_QUIET, O_SUMMARY, O_LOG,
        O_PARAMS_OUT, O_INIT_OUT
    };
    static const struct option opts[] = {
        {"mode", required_argument, 0, O_MODE},
        {"epochs", required_argument, 0, O_EPOCHS},
        {"batch-size", required_argument, 0, O_BATCH},
        {"lr", required_argument, 0, O_LR},
        {"optimizer", required_argument, 0, O_OPT},
        {"seed", required_argument, 0, O_SEED},
        {"threads", required_argument, 0, O_THREADS},
        {"local-devices", required_argument, 0, O_DEVICES},
        {"layers", required_argument, 0, O_LAYERS},
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
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    wk_train_cfg cfg;
    wk_train_cfg_defaults(&cfg);
    int c;
    long v;
    double dv;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case O_MODE:
            if (strcmp(optarg, "local") && strcmp(optarg, "ps") && strcmp(optarg, "allreduce")) {
                fprintf(stderr, "pstrain: --mode must be local, ps or allreduce, got '%s'\n",
                        optarg);
                return 2;
            }
            cfg.mode = optarg;
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
                fprintf(stderr, "pstrain: --optimizer must be sgd, momentum or adam, got '%s'\n",
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
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "pstrain: unexpected argument '%s' (see --help)\n", argv[optind]);
        return 2;
    }
    wk_train_result r;
    int status = wk_train_run(&cfg, &r);
    if (status != CM_OK) {
        fprintf(stderr, "pstrain: failed: %s\n", cm_strerror(status));
        return 1;
    }
    printf("test accuracy %.4f (loss %.4f) on %zu test images after %lld steps in %.1f s "
           "(%.0f examples/s)\n",
           r.test_accuracy, r.test_loss, r.test_examples, (long long)r.steps, r.seconds,
           r.examples_per_sec);
    return 0;
}
