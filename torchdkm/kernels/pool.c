/* A small pool of persistent threads for the inference loops (compiled with lut.c into one library).
 *
 * Why not the Python thread pool the training passes use (cpu.run_jobs): handing a job to it and waiting
 * costs 30-50 us and varies by as much, as long as a whole product of a 576x1536 layer at batch 1 (~60 us),
 * so a language model's small layers ran on one thread.  Here the caller posts the parts by bumping a
 * counter; workers that ran a part recently are still spinning on it and start within a microsecond, the
 * others sleep on a condition variable (a worker spins SPIN pauses, some tens of microseconds, before
 * it sleeps, so a busy model keeps them awake and an idle one costs nothing).  The caller runs part 0
 * itself, then waits for the others.  Callers are serialised; a forked child starts its own workers.
 */
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <unistd.h>

typedef int (*tdkm_task)(void *arg, int part, int parts);

enum { MAX_WORKERS = 63, SPIN = 20000 };

static struct {
    pthread_mutex_t lock; /* guards the sleepers' wait */
    pthread_cond_t wake;
    int workers;          /* started in this process */
    pid_t pid;            /* the process that started them */
    uint64_t generation;  /* bumped once per call: the workers' signal */
    tdkm_task task;
    void *arg;
    int parts, pending, status;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0, 0, 0};
static pthread_mutex_t callers = PTHREAD_MUTEX_INITIALIZER;
/* The generation each worker was started at: it waits for the next one (read at its start, it could
 * already be the bump of the call that started it, which it would then never run). */
static uint64_t births[MAX_WORKERS + 1];

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *worker(void *id_pointer) {
    int id = (int)(intptr_t)id_pointer; /* 1 .. workers: the part it runs */
    uint64_t seen = births[id];
    for (;;) {
        uint64_t now;
        int spins = 0;
        while ((now = __atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE)) == seen && ++spins < SPIN) relax();
        if (now == seen) {
            pthread_mutex_lock(&pool.lock);
            while ((now = __atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE)) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = now;
        if (id < pool.parts) {
            int status = pool.task(pool.arg, id, pool.parts);
            if (status) __atomic_store_n(&pool.status, status, __ATOMIC_RELAXED);
            __atomic_sub_fetch(&pool.pending, 1, __ATOMIC_RELEASE);
        }
    }
    return NULL;
}

/* At least `want` workers in this process (fewer if a thread cannot be started); returns how many. */
static int start_workers(int want) {
    if (pool.pid != getpid()) { /* a forked child: the parent's workers are not here */
        pthread_mutex_init(&pool.lock, NULL), pthread_cond_init(&pool.wake, NULL);
        pool.workers = 0, pool.pid = getpid();
    }
    if (want > MAX_WORKERS) want = MAX_WORKERS;
    while (pool.workers < want) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        births[pool.workers + 1] = pool.generation;
        int failed = pthread_create(&thread, &attr, worker, (void *)(intptr_t)(pool.workers + 1));
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.workers++;
    }
    return pool.workers;
}

/* task(arg, part, parts) for part in [0, parts), on parts threads (the caller runs part 0); the first
 * nonzero status a part returns, else 0.  Fewer parts where fewer workers could be started. */
int tdkm_parallel(tdkm_task task, void *arg, int parts) {
    if (parts <= 1) return task(arg, 0, 1);
    pthread_mutex_lock(&callers);
    int workers = start_workers(parts - 1), status = 0;
    if (workers < parts - 1) parts = workers + 1;
    pool.task = task, pool.arg = arg, pool.parts = parts, pool.status = 0;
    __atomic_store_n(&pool.pending, parts - 1, __ATOMIC_RELAXED);
    pthread_mutex_lock(&pool.lock); /* (a sleeper between its check and its wait cannot miss the bump) */
    __atomic_add_fetch(&pool.generation, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    status = task(arg, 0, parts);
    /* spin, then yield: on a busy machine a worker may be waiting for this core */
    for (int spins = 0; __atomic_load_n(&pool.pending, __ATOMIC_ACQUIRE); spins++)
        if (spins < SPIN) relax();
        else sched_yield();
    if (!status) status = __atomic_load_n(&pool.status, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&callers);
    return status;
}
