// BullMQ drain of jobs that wait JOB_MS in their handler, to set beside
// `jobq bench --scenario drain --job-ms JOB_MS` (bench/pairs.sh with JOB_MS set runs both).
// One worker process at concurrency CONC, N jobs added first with addBulk, removeOnComplete.
// Prints one JSON line. Uses the BullMQ install of the baseline (BULLMQ_DIR, default
// ../shared/bench/bullmq) and Redis at 127.0.0.1:6379, in a queue of its own that it removes.
const path = require('path');
const dir = process.env.BULLMQ_DIR || path.join(__dirname, '..', '..', 'shared', 'bench', 'bullmq');
const { Queue, Worker } = require(path.resolve(dir, 'node_modules', 'bullmq'));

const total = parseInt(process.env.N || '100000', 10);
const concurrency = parseInt(process.env.CONC || '50', 10);
const waitMs = parseInt(process.env.JOB_MS || '10', 10);
const connection = { host: '127.0.0.1', port: 6379 };
const queueName = `jobq-wait-bench-${process.pid}-${Date.now()}`;

async function main() {
  const queue = new Queue(queueName, { connection });
  for (let first = 0; first < total; first += 1000) {
    const jobs = [];
    for (let k = first; k < Math.min(total, first + 1000); k++) {
      jobs.push({ name: 'wait', data: { k }, opts: { removeOnComplete: true, removeOnFail: 1000 } });
    }
    await queue.addBulk(jobs);
  }
  let finished = 0;
  let allDone;
  const done = new Promise((resolve) => { allDone = resolve; });
  const began = process.hrtime.bigint();
  const worker = new Worker(queueName, async () => {
    await new Promise((resolve) => setTimeout(resolve, waitMs));
    finished += 1;
    if (finished === total) allDone();
  }, { connection, concurrency });
  await done;
  const secs = Number(process.hrtime.bigint() - began) / 1e9;
  const perSecond = total / secs;
  console.log(JSON.stringify({
    peer: 'bullmq', version: require(path.resolve(dir, 'node_modules', 'bullmq', 'package.json')).version,
    N: total, concurrency, job_ms: waitMs, process_jobs_per_s: Math.round(perSecond),
    slot_use: Math.round((perSecond * waitMs) / 1000 / concurrency * 1000) / 1000,
  }));
  await worker.close();
  await queue.obliterate({ force: true });
  await queue.close();
}

main().then(() => process.exit(0), (e) => { console.error(e); process.exit(1); });
