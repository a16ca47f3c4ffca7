/* Gathers and scatters of a KV cache held in host memory: what cuda/kv_copy.cu's kernel does on
 * a GPU, with the same parameters counted in bytes (a vector of one byte) and the slots as
 * int64, on the calling thread. One call copies a message's rows of every plane; each row is one memcpy.
 *
 * Built at first use by staging/host_copy.py. Called without the GIL: a copy on a transfer
 * thread leaves the engine thread of its process free to run meanwhile. Everything it is given
 * has been checked by its caller (kvferry.staging.kv_copy): slots inside the cache, a staging
 * region of exactly the rows' bytes.
 */
#include <stdint.h>
#include <string.h>

/* kv_copy's parameters (cuda/kernels.py KVCopyArgs), the lengths in bytes. */
typedef struct {
    uint64_t planes;  /* address of [num_planes] plane base addresses */
    uint64_t slots;   /* address of [num_tokens] int64 cache slots (int32 on a GPU) */
    uint64_t staging; /* [num_planes][num_tokens][row_len] bytes */
    uint32_t num_tokens, row_len;
    int64_t slot_len, head_offset; /* bytes per cache slot; the first head's offset in one */
} kvf_copy_args;

size_t kvf_copy_args_size(void) { return sizeof(kvf_copy_args); }

void kvf_host_copy(const kvf_copy_args *a, uint32_t num_planes, int gather) {
    const uint64_t *planes = (const uint64_t *)(uintptr_t)a->planes;
    const int64_t *slots = (const int64_t *)(uintptr_t)a->slots;
    uint8_t *staged = (uint8_t *)(uintptr_t)a->staging;
    const size_t row = a->row_len;
    for (uint32_t p = 0; p < num_planes; p++) {
        uint8_t *cache = (uint8_t *)(uintptr_t)planes[p] + a->head_offset;
        for (uint32_t t = 0; t < a->num_tokens; t++, staged += row) {
            uint8_t *slot = cache + slots[t] * a->slot_len;
            if (gather)
                memcpy(staged, slot, row);
            else
                memcpy(slot, staged, row);
        }
    }
}
