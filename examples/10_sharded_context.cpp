// SPDX-License-Identifier: MIT
// 10: a context too long for one process, split across MPI ranks. 64 latents read 262,144
// context positions (think hours of audio frames); each rank holds only its quarter of the keys
// and values, attends to it, and the ranks merge their partial results by log-sum-exp.
//
// What you will learn:
//   - context parallelism: attention over a concatenation of shards is exact when each shard's
//     output is weighted by exp(its log-sum-exp - the whole log-sum-exp)
//   - what travels between the ranks: a few numbers per latent, not the context
//   - masks in context positions: key padding counts the whole context, not a shard
// Run it:
//   cmake --build build --target 10_sharded_context
//   mpiexec -n 4 ./build/examples/10_sharded_context      (as root: add --allow-run-as-root;
//                                                          more ranks than cores: --oversubscribe)
// What to expect: each rank's share of the context and its memory, where the "needle" key (one
// position that matches latent 0) sits, latent 0's weight on it (about 1) and output (the
// needle's value, 2.0), the bytes each rank sent, and "all checks passed" from rank 0.
#include "xattn/distributed.hpp"

#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  bool ok = true;
  {
    using xattn::index_t;
    const xattn::communicator comm(MPI_COMM_WORLD);  // xattn's own copy of the communicator
    const int rank = comm.rank(), ranks = comm.size();
    const index_t latents = 64, H = 4, D = 32, context = 262144;
    // Rank r holds positions [begin, end): shards in rank order, as even as they come.
    const index_t begin = context * rank / ranks, end = context * (rank + 1) / ranks;
    const index_t mine = end - begin, needle = context - 1000;  // in the last rank's shard

    // Each rank makes only its own shard: small random keys, and one key (the needle) that
    // points where latent 0's queries point, with the value 2.0 everywhere.
    std::vector<float> q(std::size_t(H * latents * D)), k(std::size_t(H * mine * D)),
        v(std::size_t(H * mine * D)), out(std::size_t(H * latents * D));
    std::mt19937 gen(unsigned(7 + rank));
    std::uniform_real_distribution<float> small(-0.5f, 0.5f);
    for (float& x : k) x = small(gen);
    for (float& x : v) x = 2.0f * small(gen);
    std::mt19937 same_everywhere(1);  // the queries are the same on every rank
    for (float& x : q) x = std::uniform_real_distribution<float>(-0.5f, 0.5f)(same_everywhere);
    for (index_t h = 0; h < H; ++h) {
      for (index_t d = 0; d < D; ++d) q[std::size_t((h * latents + 0) * D + d)] = d == h ? 8.0f : 0.0f;
      if (needle >= begin && needle < end)
        for (index_t d = 0; d < D; ++d) {
          k[std::size_t((h * mine + needle - begin) * D + d)] = d == h ? 30.0f : 0.0f;
          v[std::size_t((h * mine + needle - begin) * D + d)] = 2.0f;
        }
    }
    const xattn::tensor_view<const float, 4> Q(q.data(), {1, H, latents, D});
    const xattn::tensor_view<const float, 4> K(k.data(), {1, H, mine, D});
    const xattn::tensor_view<const float, 4> V(v.data(), {1, H, mine, D});

    // The last 10 positions are padding: kv_lengths counts the whole context, on every rank.
    const index_t real_keys = context - 10;
    xattn::attention_options<float> opts;
    opts.mask.kv_lengths = xattn::tensor_view<const index_t, 1>(&real_keys, {1});
    std::vector<float> lse(std::size_t(H * latents)), weights(std::size_t(H * latents * mine));
    opts.lse_out = xattn::tensor_view<float, 3>(lse.data(), {1, H, latents});
    opts.weights_out = xattn::tensor_view<float, 4>(weights.data(), {1, H, latents, mine});
    xattn::sharded_attention<float>(comm, Q, K, V,
                                    xattn::tensor_view<float, 4>(out.data(), {1, H, latents, D}),
                                    opts);

    std::printf("rank %d: positions [%ld, %ld), keys and values %.1f MiB of the context's %.1f\n",
                rank, long(begin), long(end), double(k.size() + v.size()) * 4 / 1048576.0,
                double(2 * H * context * D) * 4 / 1048576.0);
    if (needle >= begin && needle < end) {
      const float w = weights[std::size_t((0 * latents + 0) * mine + needle - begin)];
      std::printf("rank %d holds the needle at position %ld: latent 0, head 0 gives it weight %.4f\n",
                  rank, long(needle), double(w));
      ok = ok && w > 0.99f;
    }
    // Every rank has the whole result: latent 0 reads the needle's value in every head.
    for (index_t h = 0; h < H; ++h)
      for (index_t d = 0; d < D; ++d) ok = ok && std::abs(out[std::size_t((h * latents) * D + d)] - 2.0f) < 1e-3f;
    // The other latents spread their weight over the whole context: their output is an average
    // of many small values, and their log-sum-exp is about log(number of real keys).
    ok = ok && std::abs(lse[1] - std::log(float(real_keys))) < 0.1f;
    if (rank == 0) {
      const double sent = 2.0 * double(H * latents * (D + 1)) * 4 * double(ranks - 1) / ranks;
      std::printf("latent 0, head 0 reads %.4f (the needle's 2.0); latent 1's log-sum-exp %.3f, "
                  "log(keys) %.3f\n", double(out[0]), double(lse[1]), std::log(double(real_keys)));
      std::printf("each rank sent about %.0f KiB (partial outputs and log-sum-exps), whatever "
                  "the context's length\n", sent / 1024.0);
    }
    int mine_ok = ok ? 1 : 0, all_ok = 0;
    MPI_Allreduce(&mine_ok, &all_ok, 1, MPI_INT, MPI_MIN, comm.get());
    ok = all_ok == 1;
    if (rank == 0) std::printf("%s\n", ok ? "all checks passed" : "a check FAILED");
  }  // the communicator is freed before MPI_Finalize
  MPI_Finalize();
  return ok ? 0 : 1;
}
