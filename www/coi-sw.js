// Cross-origin isolation on a static host. The threaded WebAssembly build needs
// SharedArrayBuffer, which browsers give only to cross-origin isolated pages: served with
// `Cross-Origin-Opener-Policy: same-origin` and `Cross-Origin-Embedder-Policy: require-corp`.
// `./build.sh serve` sends them; a static host (GitHub Pages and the like) cannot. This service
// worker, from our own origin, adds them to the page's same-origin responses (the page and all
// it loads are same-origin: app, worker, wasm, bundles, onnxruntime-web). app.js registers it and
// reloads once when it first takes control. Without it (no service workers, a private window,
// plain http other than localhost) the page runs the single-threaded build.
self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));

self.addEventListener("fetch", (event) => {
  const request = event.request;
  if (new URL(request.url).origin !== self.location.origin) return; // the browser's own handling
  if (request.cache === "only-if-cached" && request.mode !== "same-origin") return;
  event.respondWith(
    fetch(request).then((response) => {
      if (response.status === 0) return response; // opaque: nothing to add
      const headers = new Headers(response.headers);
      headers.set("Cross-Origin-Opener-Policy", "same-origin");
      headers.set("Cross-Origin-Embedder-Policy", "require-corp");
      headers.set("Cross-Origin-Resource-Policy", "same-origin");
      return new Response(response.body, { status: response.status, statusText: response.statusText, headers });
    }),
  );
});
