// An HTTP image-classification service with dynamic batching and a Prometheus /metrics endpoint.
//
//   node examples/http-classifier.js            # listens on PORT (default 3000)
//   curl -s localhost:3000/classify -d '{"pixels":[0,0,0.3125, ... 64 values in 0..1 ...]}'
//   curl -s localhost:3000/metrics
//
// The model is models/digits.onnx (8x8 grey digits, input 'image' [batch, 1, 8, 8], output
// 'logits' [batch, 10]). Every request is one image; concurrent requests are merged by the
// session's batcher into one native run and each response gets its own row.
import { createServer } from 'node:http';
import { fileURLToPath } from 'node:url';
import { InvalidArgumentError, QueueFullError, Session, Tensor, metrics } from 'sonde';

const session = await Session.load(fileURLToPath(new URL('../models/digits.onnx', import.meta.url)), {
  name: 'digits',
  threads: 2,
  // Up to 32 images per run; an image waits at most 2 ms for company; 1024 waiting at most.
  batching: { maxBatchSize: 32, maxDelayMs: 2, maxQueue: 1024 },
});

async function readJson(req, limit = 1 << 16) {
  let body = '';
  for await (const chunk of req) {
    body += chunk;
    if (body.length > limit) throw new InvalidArgumentError(`request body over ${limit} bytes`);
  }
  try {
    return JSON.parse(body);
  } catch {
    throw new InvalidArgumentError('request body is not JSON');
  }
}

async function classify(req, res) {
  const { pixels } = await readJson(req);
  if (!Array.isArray(pixels) || pixels.length !== 64 || !pixels.every((v) => typeof v === 'number' && Number.isFinite(v))) {
    throw new InvalidArgumentError('"pixels" must be an array of 64 finite numbers (an 8x8 image, row by row, 0..1)');
  }
  const image = new Tensor('float32', Float32Array.from(pixels), [1, 1, 8, 8]);
  // A client that hangs up stops waiting: its request leaves the queue (or its batch) at once.
  const abort = new AbortController();
  res.once('close', () => { if (!res.writableEnded) abort.abort(); });
  const { logits } = await session.run({ image }, { signal: abort.signal });
  const scores = Array.from(logits.data);
  return { label: scores.indexOf(Math.max(...scores)), logits: scores };
}

const server = createServer(async (req, res) => {
  const reply = (status, type, body) => {
    res.writeHead(status, { 'content-type': type });
    res.end(body);
  };
  try {
    if (req.method === 'POST' && req.url === '/classify') {
      reply(200, 'application/json', JSON.stringify(await classify(req, res)));
    } else if (req.method === 'GET' && req.url === '/metrics') {
      reply(200, 'text/plain; version=0.0.4; charset=utf-8', metrics.toPrometheus());
    } else {
      reply(404, 'application/json', JSON.stringify({ error: 'POST /classify or GET /metrics' }));
    }
  } catch (err) {
    // A full queue is back-pressure (retry later); a bad request is the client's; anything else is ours.
    const status = err instanceof QueueFullError ? 503 : err instanceof InvalidArgumentError ? 400 : 500;
    if (!res.headersSent && !res.destroyed) reply(status, 'application/json', JSON.stringify({ error: err.message, code: err.code }));
  }
});

server.listen(Number(process.env.PORT ?? 3000), () => {
  console.log(`listening on http://localhost:${server.address().port}`);
});

// Stop taking connections, answer what is in flight, then free the model.
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.once(signal, () => server.close(() => session.dispose()));
}
