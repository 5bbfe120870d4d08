// The client <-> worker protocol, defined once: wasmlm.js (the client) and worker.js (the engine's
// Web Worker) both import these names. Messages are plain objects with `type`; a request also
// has `req`, a number the client picks, and every message the worker sends about a request
// carries its `req`.
//
// The worker runs one request at a time (the client queues them). Each request ends with exactly
// one final message: `ready` (load), `done` (generate, chat), `ok` (everything else) or `error`.
// `cancel` gets no answer: the request it names ends early with its usual final message.

/** Requests, client -> worker. */
export const Req = Object.freeze({
  /**
   * {source, build?, threads?} -> progress*, status*, notice*, then ready. While idle after it,
   * the worker runs a short throwaway generation that any request stops (worker.js, warmUp).
   */
  LOAD: "load",
  /**
   * {session, prompt, options, continue?} -> prefill*, token*, then done. Without `continue`
   * the session's cache is emptied first (a one-shot prompt); with it, the prompt is fed after
   * what the cache holds (empty: the generation continues from the cache).
   */
  GENERATE: "generate",
  /**
   * {session, messages, options} -> prefill*, token*, then done. The assistant's next turn of
   * the whole conversation (through the chat template): the cache keeps its longest common
   * prefix with the conversation's tokens and feeds only the rest (done.fedTokens).
   */
  CHAT: "chat",
  /** {target}: stop request `target` (between tokens, prefill chunks or bench runs). */
  CANCEL: "cancel",
  /** {} -> ok {session, length}: a new, empty session. Session 0 exists after load. */
  SESSION: "session",
  /** {session} -> ok {session, length}: an independent copy of a session's cache. */
  FORK: "fork",
  /** {session, input: string | number[]} -> ok {fed, length}: feed text or token ids. */
  APPEND: "append",
  /** {session, length} -> ok {length}: keep the first `length` tokens of the cache. */
  TRUNCATE: "truncate",
  /** {session} -> ok {tokens, length}. */
  TOKENS: "tokens",
  /** {session} -> ok {length: 0}: empty the cache. */
  RESET: "reset",
  /** {session} -> ok {bytes, length}: the cache in the engine's snapshot format (transferred). */
  SNAPSHOT: "snapshot",
  /** {session, bytes} -> ok {length}; an error for another model file or damaged bytes. */
  RESTORE: "restore",
  /** {session} -> ok {}: free a session (not 0). */
  FREE: "free",
  /**
   * {text, runs, peers, profile} -> benchProgress*, benchDone {row}, then for each of `peers` (a
   * list of Peer names, run in its order) more benchProgress and peerDone {peer, row} | peerError
   * {peer, message}; then ok {cancelled}.
   */
  BENCH: "bench",
  /**
   * {text, rounds} -> sweepProgress*, then ok {cancelled, sweep}: the context sweep (decode after
   * pasts of 32 to 2,048 tokens, prefill of 128 to 1,024, a turn after a long conversation), a
   * step at a time; `sweep` holds the medians of the steps run (all of them unless cancelled).
   */
  SWEEP: "sweep",
  /**
   * {mib, rounds} -> ok {membw}: memory read bandwidth at 1 thread and at the engine's threads
   * (the threaded build; `wasmlm membw` natively), {mib, threads, rounds, one, many, ratio,
   * grew_mib}, GB/s.
   */
  MEMBW: "membw",
});

/** Messages, worker -> client. */
export const Msg = Object.freeze({
  /** {file, loaded, total, cached}: a model file's download (or cache read). */
  PROGRESS: "progress",
  /** {text}: what the worker is doing. */
  STATUS: "status",
  /** {text}: something the user should know that is not an error. */
  NOTICE: "notice",
  /** {info, build}: the model is loaded (final for load). */
  READY: "ready",
  /** {fed, of}: the prefill's progress, one message per chunk. */
  PREFILL: "prefill",
  /** {index, token, text, ms, prefill}: one new token. */
  TOKEN: "token",
  /** {reason, stats, promptTokens, fedTokens, length, context}: a generation ended (final). */
  DONE: "done",
  /** {...result}: a request other than load, generate and chat succeeded (final). */
  OK: "ok",
  /**
   * {run, of, backend}: run 0 is the warm-up, run "profile" the per-op timing, run "load" a
   * peer's download and load (its file's download sends progress messages meanwhile).
   */
  BENCH_PROGRESS: "bench-progress",
  /** {row}: this engine's benchmark row, in baselines.json's format. */
  BENCH_DONE: "bench-done",
  /** {step, of, label}: the context sweep's step `step` (from 0) of `of` is running. */
  SWEEP_PROGRESS: "sweep-progress",
  /** {peer, row}: a peer's row on the same model, prompt and protocol. */
  PEER_DONE: "peer-done",
  /** {peer, message}: that peer could not run; the next one still does. */
  PEER_ERROR: "peer-error",
  /**
   * {message, fatal, contextFull} (final). `fatal`: the engine cannot go on (a trap, a panic):
   * the client is closed and must be loaded again. `contextFull`: the request did not fit in
   * the context, and the cache is as it was.
   */
  ERROR: "error",
});

/**
 * The benchmark mode's peers, the browser engines people would pick: onnxruntime-web on the same
 * ONNX file, and wllama (llama.cpp in wasm) on the site's GGUF of the same weights (the
 * manifest's `peers.wllama`).
 */
export const Peer = Object.freeze({ ORT: "onnxruntime-web", WLLAMA: "wllama" });

/** Why a generation stopped: done.reason. */
export const StopReason = Object.freeze(["Eos", "StopString", "MaxTokens", "ContextFull", "Cancelled"]);

/** Tokens per prefill chunk: a cancel waits for at most one (~0.3 s at 200 tokens/s). */
export const PREFILL_CHUNK = 64;

/**
 * A bundle's manifest.json, checked for the fields the page and the worker read (src/manifest.rs
 * has the full format): returns it, or throws an Error that names what is missing.
 */
export function checkManifest(m, where = "manifest.json") {
  const bad = (what) => { throw new Error(`${where}: ${what}`); };
  if (!m || typeof m !== "object" || Array.isArray(m)) bad("not a JSON object");
  if (typeof m.id !== "string") bad("no id");
  if (!Array.isArray(m.files)) bad("no files list");
  const entry = (f, what) => {
    if (!f || typeof f.name !== "string" || !Number.isSafeInteger(f.bytes) || f.bytes < 0 || !/^[0-9a-f]{64}$/.test(f.sha256 ?? "")) {
      bad(`${what}: each needs a name, a size in bytes and a sha256`);
    }
  };
  for (const f of m.files) {
    entry(f, "files");
    if (f.parts !== undefined) {
      if (!Array.isArray(f.parts)) bad(`${f.name}: parts is not a list`);
      f.parts.forEach((p) => entry(p, `${f.name}'s parts`));
      if (f.parts.reduce((n, p) => n + p.bytes, 0) !== f.bytes) bad(`${f.name}: its parts' sizes do not add up to ${f.bytes}`);
    }
  }
  for (const [name, f] of Object.entries(m.peers ?? {})) {
    entry(f, `peers.${name}`);
    f.parts?.forEach((p) => entry(p, `peers.${name}'s parts`));
  }
  if (typeof m.default?.file !== "string" || !m.files.some((f) => f.name === m.default.file)) bad("no default file among its files");
  return m;
}
