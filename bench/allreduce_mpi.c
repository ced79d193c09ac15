/* allreduce_mpi.c - the Open MPI reference for bench/allreduce.c:
 * MPI_Allreduce (float32 sum, in place) on the same sizes, measured and
 * reported the same way (bench/allreduce_common.h).
 * SPDX-License-Identifier: MIT
 *
 * Built by bench/allreduce.sh with mpicc (the CMake build never needs
 * MPI) and run under mpirun with the transport chosen there:
 *   mpirun -np N allreduce_mpi --transport tcp [--sizes 4K,1M] [--repeats 3]
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/allreduce_common.h"

static int run_size(int rank, int n, float *buf, size_t bytes, int repeats,
                    const char *transport) {
    int count = (int)(bytes / sizeof(float));
    for (int i = 0; i < count; i++) buf[i] = ar_check_input(rank, (size_t)i);
    MPI_Allreduce(MPI_IN_PLACE, buf, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    int ok = 1;
    for (int i = 0; i < count; i++) ok &= buf[i] == ar_check_want(n, (size_t)i);
    memset(buf, 0, bytes);
    int iters = ar_iters(bytes), warm = ar_warmup(iters);
    for (int i = 0; i < warm; i++)
        MPI_Allreduce(MPI_IN_PLACE, buf, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    double t[AR_MAX_REPEATS];
    for (int w = 0; w < repeats; w++) {
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        for (int i = 0; i < iters; i++)
            MPI_Allreduce(MPI_IN_PLACE, buf, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        double mine = (MPI_Wtime() - t0) / iters;
        MPI_Allreduce(&mine, &t[w], 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    }
    MPI_Allreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
    if (rank == 0) ar_print("mpi", transport, n, bytes, iters, repeats, ar_median(t, repeats), ok, NULL);
    return ok;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, n, repeats = 3;
    const char *sizes_arg = ar_default_sizes, *transport = "default";
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--sizes")) sizes_arg = argv[i + 1];
        else if (!strcmp(argv[i], "--repeats")) repeats = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--transport")) transport = argv[i + 1];
    }
    size_t sizes[AR_MAX_SIZES], max = 0;
    int nsizes = ar_parse_sizes(sizes_arg, sizes);
    if (nsizes <= 0 || repeats < 1 || repeats > AR_MAX_REPEATS) {
        if (rank == 0) fprintf(stderr, "allreduce_mpi: bad --sizes or --repeats\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    for (int i = 0; i < nsizes; i++) max = sizes[i] > max ? sizes[i] : max;
    float *buf = aligned_alloc(64, (max + 63) / 64 * 64);
    memset(buf, 0, max);
    int ok = 1;
    for (int i = 0; i < nsizes; i++) ok &= run_size(rank, n, buf, sizes[i], repeats, transport);
    free(buf);
    MPI_Finalize();
    return ok ? 0 : 1;
}
