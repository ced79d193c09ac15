// pslite_bench_dense.cc - psbench's dense push-then-pull workload written against
// ps-lite's KVWorker/KVServer API, built by bench/peers.py against an unmodified
// ps-lite (github.com/dmlc/ps-lite) so both run live in the same window.
//
// Dense push/pull throughput benchmark against ps-lite's KVWorker/KVServer API.
//
// usage: bench_dense BYTES ITERS WARMUP [MODE=async|sync] [KEYS_PER_SERVER=1]
//                    [OP=push-then-pull|push-pull]
//   (all nodes -- scheduler, servers, workers -- get the same argv)
//
// Workload (per worker, per iteration):
//   ts = ZPush(keys, vals); Wait(ts);   // vals = N float32 (all 1.0f), N = BYTES/4
//   ts = ZPull(keys, &out); Wait(ts);   // out  = N float32, copied into a preallocated buffer
// or, with OP push-pull (psbench --op push-pull), one request each way:
//   ts = ZPushPull(keys, vals, &out); Wait(ts);
// keys: K = KEYS_PER_SERVER * NUM_SERVER uint64 keys, KEYS_PER_SERVER of them in
//   each server's key range (ps-lite range partitioning), each key carrying
//   N/K contiguous floats. So every request is split evenly over all servers.
// Every worker uses the SAME key set (shared model).
// Server handler:
//   async: push  -> store[key][i] += val[i] for all i, then reply (empty ack)
//          pull  -> reply with a fresh copy of store[key] for the requested keys
//   sync:  push  -> merge[key][i] += val[i]; acks are held until all NUM_WORKER
//                   workers have pushed this round, then store[key] += merge[key],
//                   merge := 0 and all held acks are sent
//          pull  -> same as async (pull is issued after own push ack)
//   push-pull: the push as above, answered (when the push would be acked) with
//          the values of the keys after it, instead of an empty ack
// Timing: workers barrier, run WARMUP iterations, barrier, time ITERS iterations
//   (push and pull latency accumulated separately; a push-pull counts as
//   push time), barrier, verify (final pull must equal NUM_WORKER*(WARMUP+ITERS)
//   for every element; a sync push-pull's answer must equal
//   NUM_WORKER*(iteration+1) at its first and last element).
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>
#include "ps/ps.h"

using namespace ps;
using Clock = std::chrono::steady_clock;

static size_t g_bytes = 4096;
static int g_iters = 20, g_warmup = 5, g_kps = 1;
static bool g_sync = false, g_pushpull = false;

struct DenseServer {
  std::unordered_map<Key, std::vector<float>> store, merge;
  std::vector<KVMeta> held;  // sync mode: acks waiting for the round to complete
  std::vector<SArray<Key>> held_keys;  // their keys (answered with values if push-pull)
  long pushes = 0, pulls = 0;

  static size_t ValLen(const KVPairs<float>& d, size_t i) {
    if (d.lens.size()) return d.lens[i];
    return d.vals.size() / d.keys.size();
  }

  // The values of 'keys' now, as an answer to 'meta'.
  void Answer(const KVMeta& meta, const SArray<Key>& keys, KVServer<float>* server) {
    size_t total = 0, nk = keys.size();
    for (size_t i = 0; i < nk; ++i) {
      auto it = store.find(keys[i]);
      CHECK(it != store.end()) << "pull of a key that was never pushed";
      total += it->second.size();
    }
    KVPairs<float> res;
    res.keys = keys;
    float* buf = new float[total];
    res.vals = SArray<float>(buf, total, true);
    for (size_t i = 0; i < nk; ++i) {
      auto& v = store[keys[i]];
      memcpy(buf, v.data(), v.size() * sizeof(float));
      buf += v.size();
    }
    server->Response(meta, res);
  }

  // An ack (push) or the values after the push (push-pull).
  void Ack(const KVMeta& meta, const SArray<Key>& keys, KVServer<float>* server) {
    if (meta.pull)
      Answer(meta, keys, server);
    else
      server->Response(meta);
  }

  void operator()(const KVMeta& meta, const KVPairs<float>& req, KVServer<float>* server) {
    size_t nk = req.keys.size();
    if (meta.push) {
      ++pushes;
      auto& target = g_sync ? merge : store;
      const float* src = req.vals.data();
      for (size_t i = 0; i < nk; ++i) {
        size_t len = ValLen(req, i);
        auto& v = target[req.keys[i]];
        if (v.size() != len) v.assign(len, 0.f);
        float* dst = v.data();
        for (size_t j = 0; j < len; ++j) dst[j] += src[j];
        src += len;
      }
      if (meta.pull) ++pulls;  // A push-pull.
      if (!g_sync) {
        Ack(meta, req.keys, server);
      } else {
        held.push_back(meta);
        held_keys.push_back(req.keys);
        if ((int)held.size() == NumWorkers()) {
          for (auto& kv : merge) {
            auto& s = store[kv.first];
            if (s.size() != kv.second.size()) s.assign(kv.second.size(), 0.f);
            float* dst = s.data();
            float* m = kv.second.data();
            for (size_t j = 0; j < s.size(); ++j) { dst[j] += m[j]; m[j] = 0.f; }
          }
          for (size_t h = 0; h < held.size(); ++h) Ack(held[h], held_keys[h], server);
          held.clear();
          held_keys.clear();
        }
      }
      return;
    }
    if (meta.pull) {
      ++pulls;
      Answer(meta, req.keys, server);
    }
  }
};

static DenseServer* g_srv = nullptr;

void StartServer() {
  if (!IsServer()) return;
  auto server = new KVServer<float>(0);
  g_srv = new DenseServer();
  server->set_request_handle(
      [](const KVMeta& m, const KVPairs<float>& d, KVServer<float>* s) { (*g_srv)(m, d, s); });
  const int rank = MyRank();
  RegisterExitCallback([server, rank]() {
    fprintf(stderr, "SERVER rank=%d pushes=%ld pulls=%ld\n", rank, g_srv->pushes, g_srv->pulls);
    delete server;
  });
}

void RunWorker() {
  if (!IsWorker()) return;
  KVWorker<float> kv(0, 0);
  const int ns = NumServers(), nw = NumWorkers();
  const size_t n = g_bytes / sizeof(float);
  const size_t nkeys = (size_t)g_kps * ns;
  CHECK_EQ(n % nkeys, 0u) << "N floats must be divisible by the key count";

  SArray<Key> keys(nkeys);
  for (int s = 0; s < ns; ++s)
    for (int l = 0; l < g_kps; ++l)
      keys[s * g_kps + l] = kMaxKey / ns * s + l;  // server s's range begins at kMaxKey/ns*s
  SArray<float> vals(n, 1.0f);
  SArray<float> out(n, 0.0f);

  int round = 0;  // Iterations so far (warm-up included).
  auto step = [&](double* tpush, double* tpull) {
    auto a = Clock::now();
    if (g_pushpull) {
      kv.Wait(kv.ZPushPull(keys, vals, &out));
      *tpush += std::chrono::duration<double>(Clock::now() - a).count();
      ++round;
      const float want = (float)nw * round;
      CHECK(!g_sync || (out[0] == want && out[n - 1] == want))
          << "push-pull " << round << ": got " << out[0] << " .. " << out[n - 1]
          << ", expected " << want;
      return;
    }
    kv.Wait(kv.ZPush(keys, vals));
    auto b = Clock::now();
    kv.Wait(kv.ZPull(keys, &out));
    auto c = Clock::now();
    *tpush += std::chrono::duration<double>(b - a).count();
    *tpull += std::chrono::duration<double>(c - b).count();
  };

  double dummy1 = 0, dummy2 = 0;
  Postoffice::Get()->Barrier(0, kWorkerGroup);
  for (int i = 0; i < g_warmup; ++i) step(&dummy1, &dummy2);
  Postoffice::Get()->Barrier(0, kWorkerGroup);
  double tpush = 0, tpull = 0;
  auto t0 = Clock::now();
  for (int i = 0; i < g_iters; ++i) step(&tpush, &tpull);
  auto t1 = Clock::now();
  double el = std::chrono::duration<double>(t1 - t0).count();
  Postoffice::Get()->Barrier(0, kWorkerGroup);

  // verify: every element must equal nw * (warmup + iters) * 1.0
  kv.Wait(kv.ZPull(keys, &out));
  const float expect = (float)nw * (g_warmup + g_iters);
  size_t bad = 0;
  for (size_t i = 0; i < n; ++i) if (out[i] != expect) ++bad;

  printf("RESULT rank=%d servers=%d workers=%d mode=%s op=%s bytes=%zu floats=%zu keys=%zu "
         "iters=%d warmup=%d elapsed_s=%.6f push_s=%.6f pull_s=%.6f verify_bad=%zu expect=%.1f\n",
         MyRank(), ns, nw, g_sync ? "sync" : "async", g_pushpull ? "push-pull" : "push-then-pull",
         g_bytes, n, nkeys, g_iters, g_warmup, el, tpush, tpull, bad, expect);
  fflush(stdout);
  CHECK_EQ(bad, 0u) << "verification failed";
}

int main(int argc, char* argv[]) {
  if (argc > 1) g_bytes = strtoull(argv[1], nullptr, 10);
  if (argc > 2) g_iters = atoi(argv[2]);
  if (argc > 3) g_warmup = atoi(argv[3]);
  if (argc > 4) g_sync = std::string(argv[4]) == "sync";
  if (argc > 5) g_kps = atoi(argv[5]);
  if (argc > 6) g_pushpull = std::string(argv[6]) == "push-pull";
  Start(0);
  StartServer();
  // make sure every server has installed its request handle before any worker
  // sends (ps-lite race: KVServer's customer exists before set_request_handle)
  Postoffice::Get()->Barrier(0, kScheduler + kServerGroup + kWorkerGroup);
  RunWorker();
  Finalize(0, true);
  return 0;
}
