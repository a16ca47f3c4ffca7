// Where the TP ranks of one daemon that share a GPU meet inside their streams, with no host
// between them: a rank's launch of this kernel returns once every rank's stream has reached the
// same point. It is a kernel like any other, so a CUDA graph can hold it.
//
// Each rank owns one flag word that every rank maps (CUDA IPC): the count of barriers the rank
// has entered. Entering, a rank makes whatever its stream wrote before visible, bumps its own
// flag, and waits until every other rank's flag has reached the same count. The ranks enter the
// same barriers in the same order (they run the same forwards), so the counts agree; a rank is
// at most one barrier ahead of any other, and the comparison is modular, so the counts may wrap.
//
// The ranks' kernels must run side by side (a CUDA MPS server): where the GPU takes the
// processes' contexts in turns, each wait lasts until the other context's turn comes.
//
// A wait longer than `timeout_ns` (a rank gone or stuck) gives up: it writes 1 + the rank it
// waited for into `error` (pinned host memory, read by the host without a sync) and returns,
// and the host raises on it; the kernel never hangs the stream.

__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

extern "C" __global__ void tp_barrier(
    const unsigned long long* __restrict__ flags,  // [world] each rank's flag word, mapped here
    const int world,
    const int rank,
    const unsigned long long timeout_ns,
    int* error)                                    // pinned host word: 1 + the rank not met
{
    if (threadIdx.x != 0 || blockIdx.x != 0)
        return;
    volatile unsigned int* mine = (volatile unsigned int*)flags[rank];
    const unsigned int count = *mine + 1;
    __threadfence_system();  // what this stream wrote before is seen before the new count
    atomicExch((unsigned int*)flags[rank], count);
    const unsigned long long start = global_ns();
    for (int r = 0; r < world; r++) {
        if (r == rank)
            continue;
        volatile const unsigned int* theirs = (volatile const unsigned int*)flags[r];
        while ((int)(*theirs - count) < 0) {
            if (global_ns() - start > timeout_ns) {
                *(volatile int*)error = r + 1;
                __threadfence_system();
                return;
            }
            __nanosleep(100);
        }
    }
    __threadfence_system();  // the others' writes before their counts are seen after this
}
