// Greedy generation on a gptdeploy export folder with onnxruntime-node alone: the KV-cache loop by hand.
//
//   node onnxruntime.mjs EXPORT_DIR "ROMEO:" ["JULIET: O" ...] [--file onnx/model_q4.onnx] [--max-new-tokens 20]
//
// Prints one line of JSON: {"file", "outputs": [{"prompt", "prompt_ids", "generated_ids", "text"}, ...]}.
// Several prompts run as one batch, left-padded. --file is any graph of the folder: onnx/model.onnx (the
// default) and its variants take the KV cache; onnx/decoder_model.onnx has none and gets the whole sequence
// at every step. The tokenizer (tokenizer.json) is read with @huggingface/transformers' AutoTokenizer.

import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import * as ort from 'onnxruntime-node';
import { AutoTokenizer, env } from '@huggingface/transformers';

const { values: options, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    file: { type: 'string', default: 'onnx/model.onnx' },
    'max-new-tokens': { type: 'string', default: '20' },
  },
});
if (positionals.length < 2) {
  console.error('usage: node onnxruntime.mjs EXPORT_DIR PROMPT [PROMPT ...] [--file onnx/model.onnx] [--max-new-tokens N]');
  process.exit(2);
}
const [folder, ...prompts] = positionals;
const maxNewTokens = Number(options['max-new-tokens']);

env.allowRemoteModels = false; // the tokenizer comes from the folder, never from the Hub
const tokenizer = await AutoTokenizer.from_pretrained(path.resolve(folder));
const eos = tokenizer.eos_token_id; // <|endoftext|>: a row stops after it
const PAD = 0; // what padded positions hold; the attention mask hides them, so any id does

const file = path.join(folder, options.file);
if (!fs.existsSync(file)) {
  console.error(`${file} does not exist (gptdeploy optimize ${folder} --variants ... writes variants)`);
  process.exit(2);
}
const session = await ort.InferenceSession.create(file);
// past_key_values.{i}.key/.value [batch, n_head, past, head_dim]. Anything else a graph may take (such as
// a variant's optional num_logits_to_keep) is left out: its default, every position's logits, is what we want.
const pastInputs = session.inputMetadata.filter((input) => input.name.startsWith('past_key_values.'));

// Left padding: every row ends at the same column, so each step's new token lands at the end of every row.
const promptIds = prompts.map((prompt) => tokenizer.encode(prompt));
for (const ids of promptIds) if (ids.length === 0) ids.push(eos); // an empty prompt starts from end-of-text
const width = Math.max(...promptIds.map((ids) => ids.length));
const batch = prompts.length;
const rows = promptIds.map((ids) => [...Array(width - ids.length).fill(PAD), ...ids]); // every token so far
const mask = promptIds.map((ids) => [...Array(width - ids.length).fill(0), ...ids.map(() => 1)]);

// Position ids count real tokens only: cumsum(mask) - 1, and 0 on padding.
function positions(maskRow) {
  let count = 0;
  return maskRow.map((m) => Math.max((count += m) - 1, 0));
}

function int64Tensor(rowsOfNumbers) {
  const data = BigInt64Array.from(rowsOfNumbers.flat(), BigInt);
  return new ort.Tensor('int64', data, [rowsOfNumbers.length, rowsOfNumbers[0].length]);
}

// The cache starts empty: every past tensor has length 0 on its past axis.
const past = {};
for (const input of pastInputs) {
  const [, heads, , headDim] = input.shape;
  const empty = input.type === 'float16' ? new Uint16Array(0) : new Float32Array(0); // fp16 graphs: fp16 cache
  past[input.name] = new ort.Tensor(input.type, empty, [batch, heads, 0, headDim]);
}

const generated = prompts.map(() => []);
const finished = prompts.map(() => false);
let fed = width; // the first step feeds the whole prompt; the next ones one token each (with a cache)

for (let step = 0; step < maxNewTokens; step++) {
  const start = pastInputs.length > 0 ? rows[0].length - fed : 0; // without a cache: the whole sequence
  const feeds = {
    input_ids: int64Tensor(rows.map((row) => row.slice(start))),
    attention_mask: int64Tensor(mask),
    position_ids: int64Tensor(mask.map((m) => positions(m).slice(start))),
    ...past,
  };
  const outputs = await session.run(feeds);

  // Greedy: the most likely next token of each row, from the logits of its last position.
  const logits = outputs.logits; // float32 [batch, seq (or 1), vocab]
  const [, seq, vocab] = logits.dims;
  for (let r = 0; r < batch; r++) {
    const offset = (r * seq + seq - 1) * vocab;
    let best = 0;
    for (let v = 1; v < vocab; v++) if (logits.data[offset + v] > logits.data[offset + best]) best = v;
    if (!finished[r]) {
      generated[r].push(best);
      finished[r] = best === eos;
    }
    rows[r].push(finished[r] ? PAD : best);
    mask[r].push(1);
  }
  if (finished.every(Boolean)) break;

  // The presents are the next step's past: present.{i}.key -> past_key_values.{i}.key.
  for (const input of pastInputs) past[input.name] = outputs[input.name.replace('past_key_values.', 'present.')];
  fed = 1;
}

const result = prompts.map((prompt, r) => ({
  prompt,
  prompt_ids: promptIds[r],
  generated_ids: generated[r],
  text: tokenizer.decode(generated[r], { skip_special_tokens: true }),
}));
console.log(JSON.stringify({ file: options.file, outputs: result }));
await session.release();
