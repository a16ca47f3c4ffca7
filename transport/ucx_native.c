/* A rank's data messages, posted and completed in native code.
 *
 * Decode: Python probes a message, checks it against its room and finds it a ring region; from
 * then on this file has it. kvf_post takes the probed message into the region with a UCX
 * receive whose completion callback (run by UCX inside ucp_worker_progress, on the transfer
 * thread) launches the scatter that moves the bytes into the paged KV cache and records the
 * event that fences it: no Python runs between the bytes landing and the copy starting. A
 * message whose size is known before it comes can have its receive posted ahead (kvf_expect):
 * then no Python runs between the message's arrival and its bytes moving either.
 * A cache in host memory is scattered into the same way, by staging/host_copy.c's copy called
 * from the callback. Prefill: kvf_send posts a gathered region's send. Python takes every
 * completed operation of a turn in one call (kvf_reap).
 *
 * Operations can be posted as a group (a prefill room's sends): a group's completions are
 * quiet, taken by Python in whatever turn comes next, but its last one, or any that failed, is
 * loud (all of them while the owner's ring is full: kvf_all_loud). Only a loud completion ends
 * a sleep, so a rank wakes once for a room's messages, not once per message.
 *
 * The transfer thread sleeps in kvf_sleep, without the GIL: it takes UCX's events itself
 * (a rendezvous's request, a fragment, a copy's completion: each progressed at once, a
 * receive posted ahead pulled in and its scatter launched) and hands the thread back to
 * Python only when an operation completed loudly, a message waits to be probed, one of
 * Python's own descriptors turned readable (its bell, a control socket, the copy stream) or
 * the timeout passed.
 *
 * Built at first use by transport/native.py, against the UCX headers of the libucx wheel that
 * ucxx loads. The CUDA driver's two entry points it calls, and the host copy, are handed in as
 * addresses, so the library needs no CUDA to build or load.
 *
 * Every function here but kvf_sleep is called with the GIL held and none of them blocks.
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stddef.h>
#include <time.h>
#include <ucp/api/ucp.h>

enum { KVF_IDLE = 0, KVF_POSTED = 1, KVF_DONE = 2 };
enum { KVF_POSTED_OK = 0, KVF_NO_MESSAGE = 1 };
/* Why kvf_sleep returned. */
enum { KVF_WOKE_TIMER = 0, KVF_WOKE_DATA = 1, KVF_WOKE_FDS = 2 };

typedef int (*cu_launch_kernel_t)(void *function, unsigned grid_x, unsigned grid_y,
                                  unsigned grid_z, unsigned block_x, unsigned block_y,
                                  unsigned block_z, unsigned shared_bytes, void *stream,
                                  void **params, void **extra);
typedef int (*cu_event_record_t)(void *event, void *stream);

/* kv_copy's parameters, in the kernel's order and types (cuda/kv_copy.cu). */
typedef struct {
    uint64_t planes, slots, staging;
    uint32_t num_tokens, row_len;
    int64_t slot_len, head_offset;
} kvf_copy_args;

#define KVF_COPY_PARAMS 7

/* staging/host_copy.c: kvf_host_copy(args counted in bytes, planes, gather) */
typedef void (*host_copy_t)(const kvf_copy_args *args, uint32_t num_planes, int gather);

typedef struct kvf_plane kvf_plane;

typedef struct {
    /* The copy to run once the bytes are in: written by Python before kvf_post. */
    void *function;  /* CUfunction; NULL: nothing to launch */
    void *stream;    /* CUstream */
    void *event;     /* CUevent, recorded after the launch */
    uint32_t grid_x, grid_y, block, id;
    uint32_t host;     /* 1: copy on the host instead (args in bytes, grid_y planes) */
    uint64_t expected; /* the bytes the message must hold for the copy to run */
    kvf_copy_args args;
    void *params[KVF_COPY_PARAMS];
    /* The receive: written here. */
    kvf_plane *plane;
    void *request;
    int32_t state;
    int32_t status;        /* ucs_status_t of the receive */
    int32_t launch_status; /* CUresult of the launch or the record; 0: fine or none */
    int32_t launched;      /* the copy is queued on the stream */
    uint64_t length;       /* bytes received */
    uint64_t done_ns;      /* CLOCK_REALTIME of its completion */
    uint32_t group;        /* 1 + its group's index in kvf_plane.groups; 0: none */
    uint32_t loud;         /* its completion calls for Python (counted in loud_count) */
} kvf_op;

struct kvf_plane {
    ucp_worker_h worker;
    cu_launch_kernel_t launch;
    cu_event_record_t record;
    host_copy_t host_copy; /* NULL where no host copy was built */
    kvf_op *ops;
    uint32_t *done; /* ids of completed receives not yet reaped: a ring of `capacity` */
    uint32_t capacity, done_head, done_count, _pad;
    /* Written by kvf_sleep, read by Python: */
    uint64_t sleep_events; /* wakes on the worker's events that needed no Python */
    uint64_t sleep_ucx_ns; /* thread CPU inside UCX's progress and arm while asleep */
    /* The staging ring, registered with UCX once (kvf_register); NULL memh: not registered. */
    ucp_context_h context;
    ucp_mem_h memh;
    uint64_t region_base, region_length;
    uint32_t memory_type, _pad2;
    /* Operations of each group still in flight, and a hold while the group is being posted
     * (kvf_group_*); written by Python between its posts, decremented here as they complete. */
    uint32_t *groups;
    uint32_t loud_count; /* loud completions not yet reaped */
    uint32_t all_loud;   /* every completion is loud (kvf_all_loud) */
};

/* The sizes Python's ctypes mirror of these structures must match (native.py checks). */
size_t kvf_op_size(void) { return sizeof(kvf_op); }
size_t kvf_plane_size(void) { return sizeof(kvf_plane); }

/* Point every op's parameter array at its own arguments and back at its plane. */
void kvf_init(kvf_plane *r) {
    for (uint32_t i = 0; i < r->capacity; i++) {
        kvf_op *op = &r->ops[i];
        kvf_copy_args *a = &op->args;
        void *params[KVF_COPY_PARAMS] = {&a->planes,   &a->slots,    &a->staging,   &a->num_tokens,
                                         &a->row_len,  &a->slot_len, &a->head_offset};
        for (int p = 0; p < KVF_COPY_PARAMS; p++)
            op->params[p] = params[p];
        op->plane = r;
        op->id = i;
        op->state = KVF_IDLE;
    }
}

static uint64_t clock_ns(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* `failed`: its status, or its copy's launch, says something went wrong. */
static void completed(kvf_op *op, int failed) {
    kvf_plane *r = op->plane;
    op->state = KVF_DONE;
    op->done_ns = clock_ns(CLOCK_REALTIME);
    op->loud = 1;
    if (op->group != 0)
        op->loud = --r->groups[op->group - 1] == 0 || failed || r->all_loud;
    r->loud_count += op->loud;
    r->done[(r->done_head + r->done_count) % r->capacity] = op->id;
    r->done_count++;
}

static void on_sent(void *request, ucs_status_t status, void *user_data) {
    kvf_op *op = user_data;
    (void)request; /* freed by kvf_reap */
    op->status = status;
    completed(op, status != UCS_OK);
}

static void on_received(void *request, ucs_status_t status, const ucp_tag_recv_info_t *info,
                        void *user_data) {
    kvf_op *op = user_data;
    kvf_plane *r = op->plane;
    (void)request; /* freed by kvf_reap: it may run before ucp_tag_msg_recv_nbx returns it */
    op->status = status;
    op->length = status == UCS_OK ? info->length : 0;
    if (status == UCS_OK && op->length == op->expected) {
        if (op->function != NULL && r->launch != NULL) {
            int rc = r->launch(op->function, op->grid_x, op->grid_y, 1, op->block, 1, 1, 0,
                               op->stream, op->params, NULL);
            op->launched = rc == 0;
            if (rc == 0)
                rc = r->record(op->event, op->stream);
            op->launch_status = rc;
        } else if (op->host && r->host_copy != NULL) {
            r->host_copy(&op->args, op->grid_y, 0);
            op->launched = 1;
        }
    }
    int copies = op->function != NULL || op->host;
    completed(op, status != UCS_OK || op->launch_status != 0 || (copies && !op->launched));
}

/* Op `id`, reset for an operation about to be posted, and the parameters that post it: its
 * completion comes to `op` (the callback, set by the caller), never inline. */
static kvf_op *start(kvf_plane *r, uint32_t id, ucp_request_param_t *param) {
    kvf_op *op = &r->ops[id];
    op->request = NULL;
    op->status = UCS_INPROGRESS;
    op->launch_status = 0;
    op->launched = 0;
    op->length = 0;
    op->loud = 0;
    op->state = KVF_POSTED;
    if (op->group != 0)
        r->groups[op->group - 1]++;
    param->op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                          UCP_OP_ATTR_FIELD_DATATYPE | UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
    param->datatype = ucp_dt_make_contig(1);
    param->user_data = op;
    return op;
}

/* A buffer inside the registered ring names its registration and memory type: UCX then skips
 * the lookup of the buffer's registration and the query of its memory type each post would
 * otherwise make (tens of µs for device memory). */
static void in_region(kvf_plane *r, ucp_request_param_t *param, const void *buffer,
                      uint64_t length) {
    uint64_t at = (uint64_t)(uintptr_t)buffer;
    if (r->memh == NULL || at < r->region_base || at + length > r->region_base + r->region_length)
        return;
    param->op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH | UCP_OP_ATTR_FIELD_MEMORY_TYPE;
    param->memh = r->memh;
    param->memory_type = (ucs_memory_type_t)r->memory_type;
}

/* Register [base, +length) (the staging ring; `memory_type` a ucs_memory_type_t) with UCX, for
 * the sends and receives posted into it. 0, or a negative ucs_status_t. */
int kvf_register(kvf_plane *r, ucp_context_h context, void *base, uint64_t length,
                 uint32_t memory_type) {
    ucp_mem_map_params_t params = {0};
    params.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                        UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
    params.address = base;
    params.length = length;
    params.memory_type = (ucs_memory_type_t)memory_type;
    ucs_status_t status = ucp_mem_map(context, &params, &r->memh);
    if (status != UCS_OK) {
        r->memh = NULL;
        return status;
    }
    r->context = context;
    r->region_base = (uint64_t)(uintptr_t)base;
    r->region_length = length;
    r->memory_type = memory_type;
    return 0;
}

/* Release the ring's registration: once nothing posted into it is in flight. */
void kvf_deregister(kvf_plane *r) {
    if (r->memh != NULL)
        ucp_mem_unmap(r->context, r->memh);
    r->memh = NULL;
}

/* What posting `op` returned: KVF_POSTED_OK, or the negative ucs_status_t it failed with. */
static int posted(kvf_op *op, ucs_status_ptr_t request) {
    if (UCS_PTR_IS_ERR(request)) {
        op->state = KVF_IDLE;
        if (op->group != 0)
            op->plane->groups[op->group - 1]--;
        return UCS_PTR_STATUS(request);
    }
    op->request = request; /* its callback may have run already: kvf_reap frees it */
    return KVF_POSTED_OK;
}

/* The oldest message waiting to be taken: 1 and its (tag, length) in out, else 0. */
int kvf_peek(ucp_worker_h worker, uint64_t *out) {
    ucp_tag_recv_info_t info;
    if (ucp_tag_probe_nb(worker, 0, 0, 0, &info) == NULL)
        return 0;
    out[0] = info.sender_tag;
    out[1] = info.length;
    return 1;
}

/* Take the message tagged `tag` into `buffer` with op `id`, launching its copy (if the op has
 * one) once it is in. KVF_POSTED_OK, KVF_NO_MESSAGE, or a negative ucs_status_t. */
int kvf_post(kvf_plane *r, uint32_t id, uint64_t tag, void *buffer, uint64_t length) {
    ucp_tag_recv_info_t info;
    ucp_tag_message_h message = ucp_tag_probe_nb(r->worker, tag, ~(ucp_tag_t)0, 1, &info);
    if (message == NULL)
        return KVF_NO_MESSAGE;
    ucp_request_param_t param = {0};
    kvf_op *op = start(r, id, &param);
    param.cb.recv = on_received;
    in_region(r, &param, buffer, length);
    return posted(op, ucp_tag_msg_recv_nbx(r->worker, buffer, length, message, &param));
}

/* Post, ahead of its message, the receive of the message tagged `tag` into `buffer` (at most
 * `length` bytes; a longer message completes UCS_ERR_MESSAGE_TRUNCATED, having written none
 * past it) with op `id`, launching its copy (if the op has one) once it is in, as kvf_post
 * does: UCX then takes the message in as it arrives, with no probe and no post after it.
 * KVF_POSTED_OK or a negative ucs_status_t. */
int kvf_expect(kvf_plane *r, uint32_t id, uint64_t tag, void *buffer, uint64_t length) {
    ucp_request_param_t param = {0};
    kvf_op *op = start(r, id, &param);
    param.cb.recv = on_received;
    in_region(r, &param, buffer, length);
    return posted(op, ucp_tag_recv_nbx(r->worker, buffer, length, tag, ~(ucp_tag_t)0, &param));
}

/* Cancel op `id` if it is in flight: a receive posted ahead whose message has not begun to
 * arrive completes UCS_ERR_CANCELED in the next progress; one under way completes as it would. */
void kvf_cancel(kvf_plane *r, uint32_t id) {
    kvf_op *op = &r->ops[id];
    if (op->state == KVF_POSTED && op->request != NULL)
        ucp_request_cancel(r->worker, op->request);
}

/* Send [buffer, +length) tagged `tag` over endpoint `ep` with op `id`. 0, or a negative
 * ucs_status_t. */
int kvf_send(kvf_plane *r, uint32_t id, ucp_ep_h ep, uint64_t tag, void *buffer,
             uint64_t length) {
    ucp_request_param_t param = {0};
    kvf_op *op = start(r, id, &param);
    param.cb.send = on_sent;
    in_region(r, &param, buffer, length);
    return posted(op, ucp_tag_send_nbx(ep, buffer, length, tag, &param));
}

/* Start group `g` (an index of kvf_plane.groups not in use): the operations posted with it
 * from now on (their `group` set to g + 1) complete quietly, but for the last. It is held
 * until kvf_group_close, so that one completing inside its post is not taken for the last. */
void kvf_group_open(kvf_plane *r, uint32_t g) { r->groups[g] = 1; }

/* Group `g`'s operations are posted: its hold goes. If every one of them completed already
 * (inside its post, quietly), one of their completions is made loud. Returns the operations
 * still in flight. */
uint32_t kvf_group_close(kvf_plane *r, uint32_t g) {
    uint32_t left = --r->groups[g];
    for (uint32_t i = 0; left == 0 && i < r->done_count; i++) {
        kvf_op *op = &r->ops[r->done[(r->done_head + i) % r->capacity]];
        if (op->group == g + 1) {
            r->loud_count += !op->loud;
            op->loud = 1;
            break;
        }
    }
    return left;
}

/* Make every completion loud from now on (`on`: the owner waits for one, its staging ring
 * full), those not yet reaped too; or groups quiet again. */
void kvf_all_loud(kvf_plane *r, uint32_t on) {
    r->all_loud = on;
    for (uint32_t i = 0; on && i < r->done_count; i++) {
        kvf_op *op = &r->ops[r->done[(r->done_head + i) % r->capacity]];
        r->loud_count += !op->loud;
        op->loud = 1;
    }
}

/* Move up to `max` completed operations' ids to `out`, oldest completion first, releasing their
 * UCX requests; the ops are idle again once their results are read. Returns how many. */
uint32_t kvf_reap(kvf_plane *r, uint32_t *out, uint32_t max) {
    uint32_t n = 0;
    while (n < max && r->done_count > 0) {
        uint32_t id = r->done[r->done_head];
        r->done_head = (r->done_head + 1) % r->capacity;
        r->done_count--;
        kvf_op *op = &r->ops[id];
        if (op->request != NULL) {
            ucp_request_free(op->request);
            op->request = NULL;
        }
        r->loud_count -= op->loud;
        op->state = KVF_IDLE;
        out[n++] = id;
    }
    return n;
}

/* Cancel every operation in flight; each completes (UCS_ERR_CANCELED, or UCS_OK had it finished)
 * in the next progress. */
void kvf_cancel_all(kvf_plane *r) {
    for (uint32_t i = 0; i < r->capacity; i++) {
        kvf_op *op = &r->ops[i];
        if (op->state == KVF_POSTED && op->request != NULL)
            ucp_request_cancel(r->worker, op->request);
    }
}

/* Progress the worker until it has nothing more to do, its CPU counted. */
static void progress_all(kvf_plane *r) {
    uint64_t began = clock_ns(CLOCK_THREAD_CPUTIME_ID);
    while (ucp_worker_progress(r->worker))
        ;
    r->sleep_ucx_ns += clock_ns(CLOCK_THREAD_CPUTIME_ID) - began;
}

/* Whether Python must look now, after a progress: a loud completion, or (`messages`) a
 * message waits to be probed; with `every_event` (operations through ucxx are in flight, or
 * endpoints closed, which only Python's own progress sees to) after any progress. */
static int python_due(kvf_plane *r, int messages, int every_event) {
    ucp_tag_recv_info_t info;
    if (every_event || r->loud_count > 0)
        return 1;
    return messages && ucp_tag_probe_nb(r->worker, 0, 0, 0, &info) != NULL;
}

/* Sleep until Python has something to do, at most `timeout_ms`; called WITHOUT the GIL (the
 * one function here that is), on the thread that owns the worker, so nothing else touches it
 * meanwhile. `watched[0]`: the worker's event descriptor; `watched[1..count)`: Python's own,
 * any of which readable ends the sleep (KVF_WOKE_FDS, their `revents` set for Python to read).
 * The worker's events are taken here (see the top of this file): the sleep ends
 * KVF_WOKE_DATA once python_due, or KVF_WOKE_TIMER at the timeout; -errno if the poll failed.
 * A message that waited before the sleep does not end it (Python probed it and left it: its
 * ring is full); `messages` says whether a newer one should. */
int kvf_sleep(kvf_plane *r, struct pollfd *watched, uint32_t count, int timeout_ms, int messages,
              int every_event) {
    uint64_t wait_ns = (uint64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000000u;
    uint64_t deadline = clock_ns(CLOCK_MONOTONIC) + wait_ns;
    if (r->loud_count > 0)
        return KVF_WOKE_DATA; /* completed inside a post: no event will tell of it */
    for (;;) {
        uint64_t began = clock_ns(CLOCK_THREAD_CPUTIME_ID);
        ucs_status_t armed = ucp_worker_arm(r->worker);
        r->sleep_ucx_ns += clock_ns(CLOCK_THREAD_CPUTIME_ID) - began;
        if (armed == UCS_ERR_BUSY) { /* events came in meanwhile */
            progress_all(r);
            if (python_due(r, messages, every_event))
                return KVF_WOKE_DATA;
            continue;
        }
        if (armed != UCS_OK)
            return KVF_WOKE_DATA; /* Python's own arm reports it */
        uint64_t now = clock_ns(CLOCK_MONOTONIC);
        int left = now >= deadline ? 0 : (int)((deadline - now + 999999u) / 1000000u);
        int ready = poll(watched, count, left);
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (ready == 0)
            return KVF_WOKE_TIMER;
        for (uint32_t i = 1; i < count; i++)
            if (watched[i].revents)
                return KVF_WOKE_FDS; /* the worker's, if ready too, is Python's to progress */
        r->sleep_events++;
        progress_all(r);
        if (python_due(r, messages, every_event))
            return KVF_WOKE_DATA;
    }
}
