// The model runs here, in a module worker, so that the page stays responsive and repaints each token.
// transformers.js comes from this server (/lib/transformers.min.js, which bundles onnxruntime-web's JavaScript)
// and so do onnxruntime-web's WASM files (/lib/ort/): nothing is fetched from a CDN.
//
// Messages in:  {model, dtype, prompt, max_new_tokens, greedy, threads}
// Messages out: {type: 'progress' | 'loaded' | 'token' | 'done' | 'error', ...}

import { BaseStreamer, env, pipeline } from '/lib/transformers.min.js';

env.allowRemoteModels = false;        // never the Hugging Face Hub
env.allowLocalModels = true;
env.localModelPath = '/models/';      // the export folder is /models/NAME/
env.useBrowserCache = false;          // the files are local already; no copy in the Cache API
env.useWasmCache = false;
// The WASM build transformers.js picks by default (asyncify), from the local onnxruntime-web package
env.backends.onnx.wasm.wasmPaths = {
  mjs: '/lib/ort/ort-wasm-simd-threaded.mjs',
  wasm: '/lib/ort/ort-wasm-simd-threaded.wasm',
};

let loaded = null;  // {key, generator}

function fetches(prefix) {
  // [path, bytes of the body] of each fetch under prefix since the last clear (same-origin: the size is known)
  return performance.getEntriesByType('resource')
    .map((e) => [new URL(e.name).pathname, e.encodedBodySize])
    .filter(([path]) => path.startsWith(prefix));
}

const total = (list) => list.reduce((sum, [, bytes]) => sum + bytes, 0);

class PageStreamer extends BaseStreamer {
  // put() gets the prompt's ids first, then one id per step
  constructor(tokenizer, start) {
    super();
    Object.assign(this, { tokenizer, start, prompt_ids: null, ids: [], times: [] });
  }
  put(value) {
    const row = value[0].map(Number);
    if (this.prompt_ids === null) {
      this.prompt_ids = row;
      return;
    }
    this.ids.push(...row);
    this.times.push(performance.now());
    postMessage({ type: 'token', text: this.tokenizer.decode(this.ids, { skip_special_tokens: true }),
                  tokens: this.ids.length, ttft_s: (this.times[0] - this.start) / 1000 });
  }
  end() {}
}

async function run(request) {
  const { model, dtype, prompt, max_new_tokens, greedy, threads } = request;
  const key = JSON.stringify([model, dtype, threads]);
  let load_s = null;
  let model_fetches = null;
  if (loaded?.key !== key) {
    if (loaded) await loaded.generator.dispose();
    loaded = null;
    if (threads > 0) env.backends.onnx.wasm.numThreads = threads;
    performance.clearResourceTimings();
    const start = performance.now();
    const generator = await pipeline('text-generation', model, {
      dtype,
      device: 'wasm',
      progress_callback: (p) => postMessage({ type: 'progress', ...p }),
    });
    load_s = (performance.now() - start) / 1000;
    model_fetches = fetches('/models/');
    loaded = { key, generator };
    postMessage({ type: 'loaded', load_s, model_bytes: total(model_fetches), library_bytes: total(fetches('/lib/')) });
  }
  const { generator } = loaded;
  const start = performance.now();
  const streamer = new PageStreamer(generator.tokenizer, start);
  const [output] = await generator(prompt, {
    max_new_tokens,
    do_sample: !greedy,
    ...(greedy ? {} : { temperature: 1.0, top_k: 50 }),
    return_full_text: false,
    streamer,
  });
  const end = performance.now();
  const { ids, times } = streamer;
  const decode_s = (times.at(-1) - times[0]) / 1000;
  postMessage({
    type: 'done',
    result: {
      model, dtype, prompt, greedy,
      prompt_ids: streamer.prompt_ids,
      generated_ids: ids,
      text: output.generated_text,
      load_s,                                   // null: the pipeline was loaded by an earlier run
      model_bytes: model_fetches && total(model_fetches),
      model_fetches,                            // [path, bytes] of each fetch from the export folder while loading
      ttft_s: (times[0] - start) / 1000,        // tokenize + prefill + the first token
      tokens_per_s: ids.length > 1 ? (ids.length - 1) / decode_s : null,   // the decode steps after the first token
      total_s: (end - start) / 1000,
      threads: env.backends.onnx.wasm.numThreads,
      cross_origin_isolated: self.crossOriginIsolated,
    },
  });
}

onmessage = async (event) => {
  try {
    await run(event.data);
  } catch (error) {
    postMessage({ type: 'error', message: String(error?.message ?? error) });
  }
};
