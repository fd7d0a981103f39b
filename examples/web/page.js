// The page: a form, the streamed text and the figures; the model runs in worker.js.
//
// URL parameters fill the form, and with a prompt the page runs at once:
//   /?dtype=q4&prompt=ROMEO:&max_new_tokens=20&greedy=1&threads=1
// When a run ends, <body data-state> is "done" (or "error") and <pre id="result"> holds the run as JSON:
// prompt_ids, generated_ids, text, load_s, ttft_s, tokens_per_s, model_bytes, ...

const $ = (id) => document.getElementById(id);
const form = $('form');
const worker = new Worker('/worker.js', { type: 'module' });
let site = null;
let prompt = '';

function state(name, text) {
  document.body.dataset.state = name;
  $('status').textContent = text;
}

const mb = (bytes) => `${(bytes / 1e6).toFixed(1)} MB`;

function showOutput(text) {
  const head = document.createElement('span');
  head.className = 'prompt';
  head.textContent = prompt;
  $('output').replaceChildren(head, document.createTextNode(text));
}

worker.onmessage = ({ data }) => {
  switch (data.type) {
    case 'progress':
      if (data.status === 'progress' && data.total) {
        state('loading', `Loading ${data.file}: ${mb(data.loaded)} of ${mb(data.total)}`);
      }
      break;
    case 'loaded':
      $('load').textContent = `${data.load_s.toFixed(2)} s`;
      $('download').textContent = `${mb(data.model_bytes)} of the export folder, ${mb(data.library_bytes)} of onnxruntime-web (WASM)`;
      state('running', 'Generating…');
      break;
    case 'token':
      showOutput(data.text);
      $('output').dataset.updates = Number($('output').dataset.updates) + 1;  // the text shown so far, per token
      $('ttft').textContent = `${(data.ttft_s * 1000).toFixed(0)} ms`;
      state('running', `Generating… ${data.tokens} tokens`);
      break;
    case 'done': {
      const r = data.result;
      showOutput(r.text);
      $('ttft').textContent = `${(r.ttft_s * 1000).toFixed(0)} ms`;
      $('rate').textContent = r.tokens_per_s === null ? '–' : `${r.tokens_per_s.toFixed(1)}`;
      $('threads_used').textContent = `${r.threads}${r.cross_origin_isolated ? '' : ' (not cross-origin isolated)'}`;
      if (r.load_s === null) $('load').textContent += ' (loaded before)';
      $('result').textContent = JSON.stringify(r);
      state('done', `Done: ${r.generated_ids.length} tokens in ${r.total_s.toFixed(2)} s`);
      $('run').disabled = false;
      break;
    }
    case 'error':
      $('result').textContent = JSON.stringify({ error: data.message });
      state('error', `Error: ${data.message}`);
      $('run').disabled = false;
      break;
    default:
  }
};
worker.onerror = (event) => {
  state('error', `Error: the worker failed: ${event.message ?? 'it could not start'}`);
  $('run').disabled = false;
};

function start() {
  const dtype = form.dtype.value;
  prompt = form.prompt.value;
  $('run').disabled = true;
  $('file').textContent = `${site.dtypes[dtype].file} (${mb(site.dtypes[dtype].bytes)} with the tokenizer and configs)`;
  for (const id of ['ttft', 'rate']) $(id).textContent = '–';
  showOutput('');
  $('output').dataset.updates = 0;
  state('loading', `Loading ${dtype}…`);
  worker.postMessage({
    model: site.name,
    dtype,
    prompt,
    max_new_tokens: Number(form.max_new_tokens.value),
    greedy: form.greedy.checked,
    threads: Number(form.threads.value),
  });
}

form.addEventListener('submit', (event) => {
  event.preventDefault();
  start();
});

try {
  site = await (await fetch('/export.json')).json();
  $('model').textContent = site.name;
  for (const dtype of Object.keys(site.dtypes)) form.dtype.add(new Option(dtype, dtype));
  const query = new URLSearchParams(location.search);
  const dtype = query.get('dtype');
  if (dtype !== null && !(dtype in site.dtypes)) {
    throw new Error(`this export folder has no ${dtype} graph (it has ${Object.keys(site.dtypes).join(', ')})`);
  }
  if (dtype !== null) form.dtype.value = dtype;
  for (const name of ['prompt', 'max_new_tokens', 'threads']) {
    if (query.has(name)) form[name].value = query.get(name);
  }
  if (query.has('greedy')) form.greedy.checked = !['0', 'false', ''].includes(query.get('greedy'));
  state('idle', 'Ready');
  if (query.has('prompt')) start();
} catch (error) {
  $('result').textContent = JSON.stringify({ error: error.message });
  state('error', `Error: ${error.message}`);
}
