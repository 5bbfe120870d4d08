//! The INT8 kernels a wasm build must have checked (tests/wasm.rs in Node, tests/browser.rs in
//! Chromium): the dynamic-quant ones against the scalar one, the `q8b32` block ones against an
//! f64 reference.

pub fn expected() -> &'static [&'static str] {
    if cfg!(all(target_feature = "simd128", feature = "relaxed-simd")) {
        &["scalar", "simd128", "relaxed-simd"]
    } else if cfg!(target_feature = "simd128") {
        &["scalar", "simd128"]
    } else {
        &["scalar"]
    }
}

/// The `q8b32` block kernels (relaxed SIMD does not apply to their 15-bit activations).
pub fn expected_block() -> &'static [&'static str] {
    if cfg!(target_feature = "simd128") {
        &["scalar", "simd128"]
    } else {
        &["scalar"]
    }
}
