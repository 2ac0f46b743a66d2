// Run an ONNX model with onnxruntime-web's wasm backend under node (the browser's CPU path):
//   node run.cjs MODEL INPUT.bin N,C,H,W BATCH OUTPUT.bin TIMING_ITERS
// INPUT.bin holds N float32 samples; they run BATCH at a time; OUTPUT.bin gets the float32
// outputs. Prints one JSON line: the backend and the median ms of one BATCH run.
const fs = require("fs");
const ort = require("onnxruntime-web");

(async () => {
  const [model, input, dims, batchArg, output, itersArg] = process.argv.slice(2);
  ort.env.wasm.numThreads = 1;
  const session = await ort.InferenceSession.create(fs.readFileSync(model), { executionProviders: ["wasm"] });
  const shape = dims.split(",").map(Number);
  const batch = Number(batchArg);
  const buf = fs.readFileSync(input);
  const data = new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4);
  const per = shape.slice(1).reduce((a, b) => a * b, 1);
  const feed = (i) => ({ [session.inputNames[0]]: new ort.Tensor("float32", data.slice(i * per, (i + batch) * per), [batch, ...shape.slice(1)]) });
  const outs = [];
  for (let i = 0; i < shape[0]; i += batch) {
    const r = await session.run(feed(i));
    outs.push(Buffer.from(r[session.outputNames[0]].data.buffer));
  }
  fs.writeFileSync(output, Buffer.concat(outs));
  const times = [];
  for (let k = 0; k < Number(itersArg); k += 1) {
    const t0 = process.hrtime.bigint();
    await session.run(feed(0));
    times.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  times.sort((a, b) => a - b);
  console.log(JSON.stringify({ backend: "wasm", version: ort.env.versions.web, median_ms: times.length ? times[times.length >> 1] : null }));
})().catch((e) => { console.error(String(e).split("\n")[0]); process.exit(1); });
