// Greedy text generation with a transformers.js `text-generation` pipeline on a gptdeploy export folder.
//
//   node pipeline.mjs EXPORT_DIR "ROMEO:" [--dtype fp32|fp16|q8|int8|q4] [--model-file model_fused]
//                     [--max-new-tokens 20]
//
// Prints {"dtype", "file", "prompt_ids", "generated_ids", "text"} as one line of JSON.
// --dtype picks the graph the way transformers.js names them: fp32 -> onnx/model.onnx,
// fp16 -> onnx/model_fp16.onnx, q8 -> onnx/model_quantized.onnx, int8 -> onnx/model_int8.onnx,
// q4 -> onnx/model_q4.onnx. --model-file replaces "model" in those names (model_fused with fp32:
// onnx/model_fused.onnx); the graph must take the KV cache (past_key_values.*), so not decoder_model.

import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { BaseStreamer, env, pipeline } from '@huggingface/transformers';

const SUFFIX = { fp32: '', fp16: '_fp16', q8: '_quantized', int8: '_int8', q4: '_q4' };

const { values: options, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    dtype: { type: 'string', default: 'fp32' },
    'model-file': { type: 'string', default: 'model' },
    'max-new-tokens': { type: 'string', default: '20' },
  },
});
if (positionals.length !== 2) {
  console.error('usage: node pipeline.mjs EXPORT_DIR PROMPT [--dtype fp32|fp16|q8|int8|q4] [--model-file NAME] [--max-new-tokens N]');
  process.exit(2);
}
const [folder, prompt] = positionals;
const { dtype } = options;
if (!(dtype in SUFFIX)) {
  console.error(`--dtype must be one of ${Object.keys(SUFFIX).join(', ')}`);
  process.exit(2);
}
if (options['model-file'].startsWith('decoder_model')) {
  console.error('transformers.js feeds a KV cache: use a graph with past inputs (model, model_fused), not decoder_model');
  process.exit(2);
}
const file = `onnx/${options['model-file']}${SUFFIX[dtype]}.onnx`;
if (!fs.existsSync(path.join(folder, file))) {
  console.error(`${path.join(folder, file)} does not exist (gptdeploy optimize ${folder} --variants ... writes it)`);
  process.exit(2);
}

// Local files only. An absolute path is read as a folder on disk, not as a Hub model id.
env.allowRemoteModels = false;
env.localModelPath = '';

const generator = await pipeline('text-generation', path.resolve(folder), {
  dtype,
  model_file_name: options['model-file'],
  device: 'cpu',
});

// The pipeline returns text; a streamer sees the token ids: first the prompt's, then one per step.
class IdCollector extends BaseStreamer {
  constructor() {
    super();
    this.calls = [];
  }
  put(ids) {
    this.calls.push(ids[0].map(Number));
  }
  end() {}
}
const streamer = new IdCollector();

const [output] = await generator(prompt, {
  max_new_tokens: Number(options['max-new-tokens']),
  do_sample: false,
  return_full_text: false,
  streamer,
});

const [prompt_ids, ...steps] = streamer.calls;
console.log(JSON.stringify({ dtype, file, prompt_ids, generated_ids: steps.flat(), text: output.generated_text }));
await generator.dispose();
