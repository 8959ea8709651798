// SPDX-License-Identifier: MIT
// Builds against xattn::mpi from an installed xattn: sharded attention over the ranks of
// MPI_COMM_WORLD, checked against tiled_attention over the whole (one key per rank).
#include <xattn/distributed.hpp>

#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <vector>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int failed = 0;
  {
    const xattn::communicator comm(MPI_COMM_WORLD);
    const xattn::index_t P = comm.size();
    std::vector<float> q = {0.5f, -1.0f}, k(std::size_t(2 * P)), v(std::size_t(2 * P));
    for (std::size_t n = 0; n < k.size(); ++n) {
      k[n] = 0.25f * float(n % 5) - 0.5f;
      v[n] = float(n);
    }
    std::vector<float> out(2), want(2);
    const auto view = [](const std::vector<float>& x, xattn::index_t rows) {
      return xattn::tensor_view<const float, 4>(x.data(), {1, 1, rows, 2});
    };
    const xattn::index_t r = comm.rank();
    xattn::sharded_attention<float>(
        comm, view(q, 1), xattn::tensor_view<const float, 4>(k.data() + 2 * r, {1, 1, 1, 2}),
        xattn::tensor_view<const float, 4>(v.data() + 2 * r, {1, 1, 1, 2}),
        xattn::tensor_view<float, 4>(out.data(), {1, 1, 1, 2}));
    xattn::tiled_attention<float>(view(q, 1), view(k, P), view(v, P),
                                  xattn::tensor_view<float, 4>(want.data(), {1, 1, 1, 2}));
    for (int e = 0; e < 2; ++e) failed |= std::abs(out[std::size_t(e)] - want[std::size_t(e)]) > 1e-5f;
    std::printf("sharded over %d ranks: %g %g (one process: %g %g)\n", int(P), double(out[0]),
                double(out[1]), double(want[0]), double(want[1]));
  }
  MPI_Finalize();
  return failed;
}
