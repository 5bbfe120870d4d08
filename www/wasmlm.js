// wasmlm's JavaScript client: the engine in a Web Worker (worker.js), behind promises and async
// iterators. The page (app.js) uses it; so can any web app:
//
//   import { WasmLM } from "./wasmlm.js";
//   const lm = await WasmLM.load("models/smollm2-135m/", { onProgress: (p) => console.log(p) });
//   const reply = lm.chat([{ role: "user", content: "What is the capital of France?" }]);
//   for await (const t of reply) out.textContent += t.text;
//   console.log((await reply.done).stats);
//
// The protocol with the worker is protocol.js's; requests are queued and run one at a time.
import { Req, Msg, Peer } from "./protocol.js";
import { hubSource } from "./hub.js";

/**
 * @typedef {object} BundleSource  A bundle made by `./build.sh` (a folder with manifest.json).
 * @property {"bundle"} kind
 * @property {string} base  The folder's URL, ending in "/"; another origin must allow CORS.
 * @property {string} [file]  The ONNX file to run (default: the manifest's default).
 *
 * @typedef {object} HubSource  A Hugging Face repository laid out as transformers.js's are
 *   (config.json, tokenizer.json, tokenizer_config.json, onnx/model<suffix>.onnx; hub.js).
 *   Fetched once per revision with progress, checked by sha256 and kept in the browser's cache;
 *   a later load reads the cache, also offline.
 * @property {"hub"} kind
 * @property {string} repo  e.g. "onnx-community/SmolLM2-135M-Instruct"
 * @property {"fp32"|"fp16"|"q8"|"int8"|"uint8"|"q4"|"q4f16"|"bnb4"} [dtype]  Which onnx/ file (default "q8").
 * @property {string} [revision]  Branch, tag or commit (default "main").
 * @property {string} [endpoint]  Default "https://huggingface.co" (a mirror with the same URL layout works too).
 * @property {number} [context]  At most config.json's max_position_embeddings (the default).
 *
 * @typedef {object} UserSource  A decoder's own files (e.g. from a file picker).
 * @property {"user"} kind
 * @property {string} name
 * @property {Blob} onnx
 * @property {Blob} tokenizer  tokenizer.json
 * @property {Blob} [config]  tokenizer_config.json (chat template, EOS)
 * @property {Blob} [chatTemplate]  chat_template.jinja (the chat template, where newer repositories keep it; it takes precedence)
 * @property {Blob} [modelConfig]  config.json (the model's family, shown in `info.family`)
 * @property {File[]} [external]  The ONNX file's external data (e.g. model.onnx_data), by file name
 * @property {number} context  The context length to allow, in tokens.
 *
 * @typedef {object} LoadOptions
 * @property {(p: {file: string, loaded: number, total: number, cached: boolean}) => void} [onProgress]
 * @property {(text: string) => void} [onStatus]
 * @property {(text: string) => void} [onNotice]
 * @property {"threads"|"relaxed"|"simd"|"nosimd"} [build]  Force a wasm build (default: the best this browser runs).
 * @property {number} [threads]  Threads for the threaded build (default: the cores but one, at most 8).
 * @property {string|URL} [workerUrl]  Where worker.js is (default: beside this module).
 * @property {number} [watchdogMs]  A generation or chat whose worker sends nothing for this long
 *   (default 60,000: a prompt chunk or a token takes far less) is taken for a hung engine (e.g. a
 *   thread of the threaded build that crashed): the worker is stopped and the request fails with a
 *   fatal WasmLMError.
 *
 * @typedef {object} GenerateOptions  The engine's (snake_case, as in Rust).
 * @property {number} [max_new_tokens]  Default 64.
 * @property {number} [temperature]  0: greedy (the default).
 * @property {number} [top_k]
 * @property {number} [top_p]
 * @property {number} [repetition_penalty]
 * @property {number} [seed]
 * @property {string[]} [stop]  Stop strings (not emitted).
 * @property {boolean} [ignore_eos]
 * @property {boolean} [chat]  generate(): wrap the prompt in the chat template as one user turn.
 *
 * @typedef {object} StreamOptions
 * @property {AbortSignal} [signal]  Aborting stops the generation between two tokens or prefill chunks.
 * @property {(t: Token) => void} [onToken]
 * @property {(p: {fed: number, of: number}) => void} [onPrefill]  The prefill's progress, per chunk.
 *
 * @typedef {object} Token
 * @property {number} index
 * @property {number} token  Its id.
 * @property {string} text  The text it completes (may be empty in the middle of a character).
 * @property {number} ms  Engine time: for the first token the prefill and sampling (time to first token), then one decode step.
 * @property {boolean} prefill  True for the first token.
 *
 * @typedef {object} Done
 * @property {"Eos"|"StopString"|"MaxTokens"|"ContextFull"|"Cancelled"} reason
 * @property {{prompt_tokens: number, new_tokens: number, ttft_ms: number, decode_ms_median: number, decode_ms_p90: number, tokens_per_s: number}} stats
 * @property {number} promptTokens  Tokens of the prompt (a chat: of the whole conversation).
 * @property {number} fedTokens  Tokens the prefill ran (a chat turn: those the cache did not hold).
 * @property {number} length  Tokens in the cache after the reply.
 * @property {number} context
 *
 * @typedef {{role: "system"|"user"|"assistant", content: string}} Message
 */

/** An error from the engine; `fatal`: the client is closed; `contextFull`: the cache is intact. */
export { Peer };

export class WasmLMError extends Error {
  constructor(message, { fatal = false, contextFull = false, during = "" } = {}) {
    super(message);
    this.name = "WasmLMError";
    this.fatal = fatal;
    this.contextFull = contextFull;
    this.during = during;
  }
}

const aborted = () => new DOMException("the request was aborted", "AbortError");

/** The default of LoadOptions.watchdogMs. */
const WATCHDOG_MS = 60_000;
/** The requests the watchdog bounds: their worker sends a message per prompt chunk or token. */
const WATCHED = new Set([Req.GENERATE, Req.CHAT]);

// Arguments are checked here, so that a wrong type is a clear error, never a failure inside the
// engine's glue (which would close the client).
function check(ok, what) {
  if (!ok) throw new WasmLMError(what);
}
const isIds = (x) => (Array.isArray(x) || ArrayBuffer.isView(x)) && Array.from(x).every((t) => Number.isInteger(t) && t >= 0);

/**
 * A generation's tokens as an async iterator; `done` resolves with its summary (also when the
 * loop that reads it stops early, which cancels it).
 * @implements {AsyncIterable<Token>}
 */
export class TokenStream {
  constructor() {
    /** @type {Token[]} */
    this.queue = [];
    this.waiting = null;
    this.finished = false;
    this.failure = null;
    this.cancel = () => {};
    /** @type {Promise<Done>} */
    this.done = new Promise((resolve, reject) => { this.resolveDone = resolve; this.rejectDone = reject; });
    this.done.catch(() => {}); // read through the iterator or `done`, whichever the caller uses
  }

  push(token) {
    this.queue.push(token);
    this.wake();
  }

  end(done) {
    this.finished = true;
    this.resolveDone(done);
    this.wake();
  }

  fail(err) {
    this.finished = true;
    this.failure = err;
    this.rejectDone(err);
    this.wake();
  }

  wake() {
    const w = this.waiting;
    this.waiting = null;
    w?.();
  }

  async *[Symbol.asyncIterator]() {
    try {
      for (;;) {
        if (this.queue.length) {
          yield this.queue.shift();
        } else if (this.failure) {
          throw this.failure;
        } else if (this.finished) {
          return;
        } else {
          await new Promise((resolve) => { this.waiting = resolve; });
        }
      }
    } finally {
      if (!this.finished) this.cancel(); // the loop stopped early
    }
  }
}

/** A KV cache in the engine: one conversation. */
export class Session {
  /** @param {WasmLM} lm @param {number} id @param {number} length */
  constructor(lm, id, length = 0) {
    this.lm = lm;
    this.id = id;
    /** Tokens in the cache, as of the last request that changed it. */
    this.length = length;
  }

  /**
   * Generate from a prompt. By default a one-shot completion: the cache is emptied first. With
   * `{continue: true}` the prompt is fed after what the cache holds ("" continues from it).
   * @param {string} prompt
   * @param {GenerateOptions & StreamOptions & {continue?: boolean}} [options]
   */
  generate(prompt, options = {}) {
    check(typeof prompt === "string", "generate(prompt): the prompt must be a string");
    const { signal, onToken, onPrefill, continue: cont = false, ...opts } = options;
    return this.lm.stream({ type: Req.GENERATE, session: this.id, prompt, options: opts, continue: cont },
      { signal, onToken, onPrefill, session: this });
  }

  /**
   * The assistant's next turn of `messages` (the whole conversation so far, through the chat
   * template); only what the cache does not hold is run.
   * @param {Message[]} messages
   * @param {GenerateOptions & StreamOptions} [options]
   */
  chat(messages, options = {}) {
    check(Array.isArray(messages) && messages.every((m) => typeof m?.role === "string" && typeof m?.content === "string"),
      "chat(messages): expected an array of {role, content} strings");
    const { signal, onToken, onPrefill, ...opts } = options;
    return this.lm.stream({ type: Req.CHAT, session: this.id, messages, options: opts },
      { signal, onToken, onPrefill, session: this });
  }

  /** Feed text or token ids after what the cache holds. @returns {Promise<number>} tokens fed */
  async append(input) {
    check(typeof input === "string" || isIds(input), "append(input): text, or token ids (non-negative integers)");
    const r = await this.call(Req.APPEND, { input: typeof input === "string" ? input : Array.from(input) });
    return r.fed;
  }

  /** Keep the first `length` tokens of the cache. */
  async truncate(length) {
    check(Number.isInteger(length) && length >= 0, "truncate(length): a token count, 0 or more");
    await this.call(Req.TRUNCATE, { length });
  }

  /** An independent copy of this cache. @returns {Promise<Session>} */
  async fork() {
    const r = await this.lm.request({ type: Req.FORK, session: this.id });
    return new Session(this.lm, r.session, r.length);
  }

  /** @returns {Promise<number[]>} the tokens the cache holds */
  async tokens() {
    return (await this.call(Req.TOKENS)).tokens;
  }

  async reset() {
    await this.call(Req.RESET);
  }

  /** The cache as bytes, tied to the model file's sha256. @returns {Promise<Uint8Array>} */
  async snapshot() {
    return (await this.call(Req.SNAPSHOT)).bytes;
  }

  /** Load a snapshot; refused (the cache intact) for another model file or damaged bytes. */
  async restore(bytes) {
    check(bytes instanceof Uint8Array, "restore(bytes): a Uint8Array from snapshot()");
    await this.call(Req.RESTORE, { bytes });
  }

  /** Free this session's cache (not the first session's, which lives as long as the model). */
  async free() {
    await this.lm.request({ type: Req.FREE, session: this.id });
  }

  async call(type, fields = {}) {
    const r = await this.lm.request({ type, session: this.id, ...fields });
    if (typeof r.length === "number") this.length = r.length;
    return r;
  }
}

/** The engine, loaded with one model, in its own Web Worker. */
export class WasmLM {
  /**
   * Start a worker and load a model into it.
   * @param {string | BundleSource | HubSource | UserSource} source  A bundle folder's URL, or a source.
   * @param {LoadOptions} [options]
   * @returns {Promise<WasmLM>}
   */
  static async load(source, options = {}) {
    const lm = new WasmLM(options);
    try {
      await lm.loadModel(source, options);
    } catch (err) {
      lm.terminate();
      throw err;
    }
    return lm;
  }

  /** @param {LoadOptions} options */
  constructor(options = {}) {
    const watchdogMs = options.watchdogMs ?? WATCHDOG_MS;
    check(watchdogMs > 0, `watchdogMs: a positive number of milliseconds, not ${options.watchdogMs}`);
    const url = new URL(options.workerUrl ?? "./worker.js", import.meta.url);
    this.worker = new Worker(url, { type: "module" });
    this.next = 1;
    this.pending = new Map(); // req -> {onMessage, resolve, reject}
    this.queue = Promise.resolve();
    this.closed = null;
    this.onNotice = options.onNotice;
    /** Called once when the engine fails for good (`fatal`); load a new WasmLM then. */
    this.onFatal = null;
    this.watchdogMs = watchdogMs;
    /** The request the worker runs: {req, type, last} (last: when it last heard of it). */
    this.active = null;
    this.watchdog = null;
    this.worker.onmessage = (e) => this.receive(e.data);
    this.worker.onerror = (e) => {
      this.close(new WasmLMError(`the engine's worker failed: ${e.message || "could not start (module workers need a recent browser)"}`, { fatal: true }));
    };
    /**
     * The loaded model: model, file, file_bytes, precision, context, eos_ids, has_chat_template,
     * layout (the cache's names and shape, and whether it is kept in place), int8_kernels and
     * fused_ops (the fast paths in use), family (config.json's model_type, where known), hub
     * ({repo, revision, dtype, file} for a repository), ...
     */
    this.info = null;
    /** The wasm build running: simd, threads, threadCount, version, tract, ... */
    this.build = null;
    /** The session made at load. */
    this.session = new Session(this, 0);
  }

  /** Load (another) model in this worker; earlier sessions are gone. */
  async loadModel(source, options = {}) {
    if (typeof source === "string") source = { kind: "bundle", base: source.endsWith("/") ? source : source + "/" };
    if (source?.kind === "hub") {
      try {
        source = hubSource(source);
      } catch (err) {
        throw new WasmLMError(err.message);
      }
    }
    const ready = await this.request({ type: Req.LOAD, source, build: options.build, threads: options.threads }, {
      [Msg.PROGRESS]: (m) => options.onProgress?.(m),
      [Msg.STATUS]: (m) => options.onStatus?.(m.text),
    });
    this.info = ready.info;
    this.build = ready.build;
    this.session = new Session(this, 0);
    return ready;
  }

  /** @see Session#generate */
  generate(prompt, options) {
    return this.session.generate(prompt, options);
  }

  /** @see Session#chat */
  chat(messages, options) {
    return this.session.chat(messages, options);
  }

  /** A new, empty session (its own KV cache). @returns {Promise<Session>} */
  async newSession() {
    const r = await this.request({ type: Req.SESSION });
    return new Session(this, r.session, 0);
  }

  /**
   * The benchmark protocol on the loaded file (32-token prompt from `text`, 64 greedy tokens,
   * a warm-up then `runs` runs), then each of `peers` (Peer names: onnxruntime-web on the same
   * file, wllama on the site's GGUF of the same weights) in the same protocol. `onRow(row)` gets
   * our row and `onPeer(peer, row | undefined, error | undefined)` each peer's, as they come;
   * `onProgress` gets {run, of, backend} per run ("load": a peer's download and load), and
   * {file, loaded, total, cached} while a peer's file downloads.
   * @returns {Promise<{cancelled: boolean, row?: object, peers: Object<string, object>, peerErrors: Object<string, string>}>}
   */
  async bench(text, { runs = 5, peers = [], profile = false, signal, onProgress, onRow, onPeer } = {}) {
    const known = Object.values(Peer);
    if (!Array.isArray(peers) || peers.some((p) => !known.includes(p))) {
      throw new WasmLMError(`bench: peers must be a list of ${known.join(", ")}, not ${JSON.stringify(peers)}`);
    }
    const out = { cancelled: false, peers: {}, peerErrors: {} };
    const r = await this.request({ type: Req.BENCH, text, runs, peers, profile }, {
      [Msg.BENCH_PROGRESS]: (m) => onProgress?.({ run: m.run, of: m.of, backend: m.backend }),
      // a peer's file: {file, loaded, total, cached}
      [Msg.PROGRESS]: (m) => onProgress?.({ file: m.file, loaded: m.loaded, total: m.total, cached: m.cached }),
      [Msg.BENCH_DONE]: (m) => { out.row = m.row; onRow?.(m.row); },
      [Msg.PEER_DONE]: (m) => { out.peers[m.peer] = m.row; onPeer?.(m.peer, m.row); },
      [Msg.PEER_ERROR]: (m) => { out.peerErrors[m.peer] = m.message; onPeer?.(m.peer, undefined, m.message); },
    }, signal);
    return { ...out, cancelled: r.cancelled };
  }

  /**
   * The context sweep on the loaded file: decode ms/token after pasts of 32 to 2,048 tokens,
   * prefill tokens/s for 128 to 1,024, and a 20-token turn after a 1,000-token conversation
   * against the same turn on an empty cache (a few minutes a round in a browser). `onProgress`
   * gets {step, of, label} before each step; an abort ends it after the running step, with what
   * was measured.
   * @returns {Promise<{cancelled: boolean, sweep: object}>}
   */
  async sweep(text, { rounds = 1, signal, onProgress } = {}) {
    if (typeof text !== "string") throw new WasmLMError("sweep: the text must be a string");
    if (!(Number.isInteger(rounds) && rounds >= 1)) throw new WasmLMError(`sweep: rounds must be a whole number from 1, not ${rounds}`);
    const r = await this.request({ type: Req.SWEEP, text, rounds }, { [Msg.SWEEP_PROGRESS]: (m) => onProgress?.(m) }, signal);
    return { cancelled: r.cancelled, sweep: r.sweep };
  }

  /**
   * Memory read bandwidth at 1 thread and at the engine's threads, alternating rounds (the
   * threaded build only; the same code as `wasmlm membw` natively): whether a second worker adds
   * read bandwidth, which a decode step is bound by. A `mib` buffer (far larger than the CPU's
   * cache) is read; wasm memory grows by `grew_mib` MiB for it (up to `mib`: the load's freed
   * memory is seldom one piece that large) and never shrinks, so the page keeps that until it is
   * reloaded.
   * @returns {Promise<{mib: number, threads: number, rounds: number[][], one: number, many: number, ratio: number, grew_mib: number}>}
   */
  async membw({ mib = 128, rounds = 5 } = {}) {
    for (const [name, v] of [["mib", mib], ["rounds", rounds]]) {
      if (!(Number.isInteger(v) && v >= 1 && v <= 4096)) throw new WasmLMError(`membw: ${name} must be a whole number from 1 to 4096, not ${v}`);
    }
    return (await this.request({ type: Req.MEMBW, mib, rounds })).membw;
  }

  /** Stop the worker; every request still pending fails. */
  terminate() {
    this.close(new WasmLMError("the engine was terminated", { fatal: true }));
  }

  // ---- the protocol -------------------------------------------------------------------------

  close(err) {
    if (this.closed) return;
    this.closed = err;
    clearInterval(this.watchdog);
    this.worker.terminate();
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    if (err.fatal && this.onFatal) this.onFatal(err);
  }

  /**
   * Send a request when the ones before it are done; resolves with its final message.
   * `on` maps the message types it may send meanwhile to handlers.
   */
  request(message, on = {}, signal) {
    const req = this.next++;
    const run = () => new Promise((resolve, reject) => {
      if (this.closed) return reject(this.closed);
      if (signal?.aborted) return reject(aborted());
      const onAbort = () => this.worker.postMessage({ type: Req.CANCEL, target: req });
      signal?.addEventListener("abort", onAbort, { once: true });
      const settle = (fn) => (v) => {
        signal?.removeEventListener("abort", onAbort);
        this.pending.delete(req);
        this.watch(null);
        fn(v);
      };
      this.pending.set(req, { on, resolve: settle(resolve), reject: settle(reject), type: message.type });
      this.watch(WATCHED.has(message.type) ? { req, type: message.type, last: performance.now() } : null);
      this.worker.postMessage({ ...message, req }); // bytes are copied: the caller keeps its own
    });
    const result = this.queue.then(run, run);
    this.queue = result.catch(() => {});
    return result;
  }

  /** A generation: a TokenStream fed by the request's messages. */
  stream(message, { signal, onToken, onPrefill, session }) {
    const tokens = new TokenStream();
    const controller = new AbortController();
    tokens.cancel = () => controller.abort();
    signal?.addEventListener("abort", () => controller.abort(), { once: true });
    if (signal?.aborted) controller.abort();
    this.request(message, {
      [Msg.PREFILL]: (m) => onPrefill?.({ fed: m.fed, of: m.of }),
      [Msg.TOKEN]: (m) => {
        const t = { index: m.index, token: m.token, text: m.text, ms: m.ms, prefill: m.prefill };
        onToken?.(t);
        tokens.push(t);
      },
    }, controller.signal).then((done) => {
      if (session) session.length = done.length;
      tokens.end(done);
    }, (err) => tokens.fail(err));
    return tokens;
  }

  /** Watch `active` (a request whose worker must keep talking), or nothing. */
  watch(active) {
    this.active = active;
    if (!active) {
      clearInterval(this.watchdog);
      this.watchdog = null;
      return;
    }
    this.watchdog ??= setInterval(() => {
      const a = this.active;
      if (a && performance.now() - a.last > this.watchdogMs) {
        this.close(new WasmLMError(`the engine sent nothing for ${this.watchdogMs} ms during a ${a.type} ` +
          "(a crashed worker thread?): it was stopped", { fatal: true, during: a.type }));
      }
    }, Math.min(1000, this.watchdogMs));
  }

  receive(m) {
    if (m.type === Msg.NOTICE) this.onNotice?.(m.text);
    if (this.active?.req === m.req) this.active.last = performance.now();
    const p = this.pending.get(m.req);
    if (!p) return;
    if (m.type === Msg.ERROR) {
      const err = new WasmLMError(m.message, { fatal: m.fatal, contextFull: m.contextFull, during: p.type });
      p.reject(err);
      if (m.fatal) this.close(err);
    } else if (m.type === Msg.READY || m.type === Msg.DONE || m.type === Msg.OK) {
      p.resolve(m);
    } else {
      p.on[m.type]?.(m);
    }
  }
}
