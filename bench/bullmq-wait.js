// BullMQ drain of jobs that wait JOB_MS in their handler (0: return at once), to set beside
// `jobq bench --scenario drain --job-ms JOB_MS` (bench/pairs.sh with JOB_MS set runs both, and
// bench/scale.sh with one and two worker processes).
// WORKERS worker processes (default 1; the first in this process, the others forked) at
// concurrency CONC each, N jobs added first with addBulk, removeOnComplete. The clock starts
// before the workers are created and stops when the last handler returns. Prints one JSON
// line, with the handlers' mean time (`handler_ms`: setTimeout's wait as it came out) and a
// slot's turn (`slot_cycle_ms`: WORKERS × CONC ÷ jobs/s). Uses the BullMQ install of the baseline (BULLMQ_DIR, default ../shared/bench/bullmq)
// and Redis at 127.0.0.1:6379, in a queue of its own that it removes.
// `cpu_us_per_job` is the CPU time per job, during the drain only, of Redis (INFO cpu: every
// client's work on that Redis counts) and of the worker processes (process.cpuUsage of each,
// the forked ones reporting theirs as they stop), as `jobq bench --scenario drain` reports its
// own.
const path = require('path');
const { fork } = require('child_process');
const dir = process.env.BULLMQ_DIR || path.join(__dirname, '..', '..', 'shared', 'bench', 'bullmq');
const { Queue, Worker } = require(path.resolve(dir, 'node_modules', 'bullmq'));
const Redis = require(path.resolve(dir, 'node_modules', 'ioredis'));

const total = parseInt(process.env.N || '100000', 10);
const concurrency = parseInt(process.env.CONC || '50', 10);
const waitMs = parseInt(process.env.JOB_MS || '10', 10);
const workers = parseInt(process.env.WORKERS || '1', 10);
const connection = { host: '127.0.0.1', port: 6379 };

// A worker whose handler calls `onDone` with how long it took (ns) after each job.
function startWorker(queueName, onDone) {
  const handler = waitMs > 0
    ? async () => {
      const t = process.hrtime.bigint();
      await new Promise((resolve) => setTimeout(resolve, waitMs));
      onDone(Number(process.hrtime.bigint() - t));
    }
    : async () => { onDone(0); };
  return new Worker(queueName, handler, { connection, concurrency });
}

// A forked worker process: reports its finished jobs and their handlers' time to the parent
// every 100 jobs and every 5 ms, so that the IPC costs far less than the jobs, and runs until
// the parent says stop.
function child(queueName) {
  let unreported = 0;
  let ns = 0;
  const report = () => {
    if (unreported > 0) {
      process.send([unreported, ns]);
      unreported = 0;
      ns = 0;
    }
  };
  const worker = startWorker(queueName, (took) => {
    unreported += 1;
    ns += took;
    if (unreported >= 100) report();
  });
  const flush = setInterval(report, 5);
  process.on('message', async () => {
    clearInterval(flush);
    await worker.close();
    process.send({ cpuUs: cpuUs(process.cpuUsage()) });
    process.exit(0);
  });
}

// µs of CPU (user + system) in a process.cpuUsage() value.
function cpuUs({ user, system }) {
  return user + system;
}

// µs of CPU Redis has used since it started (user + system, all its threads).
async function redisCpuUs(redis) {
  const info = await redis.info('cpu');
  const field = (name) => parseFloat(info.match(new RegExp(`^${name}:([0-9.]+)`, 'm'))[1]);
  return (field('used_cpu_sys') + field('used_cpu_user')) * 1e6;
}

async function main() {
  const queueName = `jobq-wait-bench-${process.pid}-${Date.now()}`;
  const queue = new Queue(queueName, { connection });
  for (let first = 0; first < total; first += 1000) {
    const jobs = [];
    for (let k = first; k < Math.min(total, first + 1000); k++) {
      jobs.push({ name: 'wait', data: { k }, opts: { removeOnComplete: true, removeOnFail: 1000 } });
    }
    await queue.addBulk(jobs);
  }
  let finished = 0;
  let handlerNs = 0;
  let allDone;
  const done = new Promise((resolve) => { allDone = resolve; });
  const count = ([k, ns]) => {
    finished += k;
    handlerNs += ns;
    if (finished >= total) allDone();
  };
  const redis = new Redis(connection);
  const redisBefore = await redisCpuUs(redis);
  const cpuBefore = process.cpuUsage();
  const began = process.hrtime.bigint();
  const children = [];
  let childrenCpuUs = 0;
  for (let i = 1; i < workers; i++) {
    const c = fork(__filename, [], { env: { ...process.env, BULLMQ_WAIT_QUEUE: queueName } });
    c.on('message', (m) => {
      if (Array.isArray(m)) count(m); else childrenCpuUs += m.cpuUs;
    });
    children.push(c);
  }
  const worker = startWorker(queueName, (took) => count([1, took]));
  await done;
  const secs = Number(process.hrtime.bigint() - began) / 1e9;
  const redisUs = (await redisCpuUs(redis)) - redisBefore;
  const mainCpuUs = cpuUs(process.cpuUsage(cpuBefore));
  const perSecond = total / secs;
  // The forked workers report their CPU as they stop, after the clock.
  await Promise.all(children.map((c) => new Promise((resolve) => { c.on('exit', resolve); c.send('stop'); })));
  const perJob = (us) => Math.round((us / total) * 10) / 10;
  console.log(JSON.stringify({
    peer: 'bullmq', version: require(path.resolve(dir, 'node_modules', 'bullmq', 'package.json')).version,
    N: total, workers, concurrency, job_ms: waitMs, process_jobs_per_s: Math.round(perSecond),
    slot_use: Math.round((perSecond * waitMs) / 1000 / (concurrency * workers) * 1000) / 1000,
    slot_cycle_ms: Math.round((concurrency * workers * 1000 / perSecond) * 100) / 100,
    handler_ms: Math.round(handlerNs / finished / 1e4) / 100,
    cpu_us_per_job: { redis: perJob(redisUs), worker: perJob(mainCpuUs + childrenCpuUs) },
  }));
  await worker.close();
  redis.disconnect();
  await queue.obliterate({ force: true });
  await queue.close();
}

if (process.env.BULLMQ_WAIT_QUEUE) {
  child(process.env.BULLMQ_WAIT_QUEUE);
} else {
  main().then(() => process.exit(0), (e) => { console.error(e); process.exit(1); });
}
