//! Pixel data: sky, noise and point sources, encoded row by row as BITPIX=16 big-endian
//! values with BZERO=32768. Fast by construction: one xorshift step yields four pixels
//! through a per-file table of sky-plus-noise values.

use std::f64::consts::PI;
use std::sync::OnceLock;

use super::FitsParams;

/// Standard deviation of the sky noise, in counts.
const NOISE_SIGMA: f64 = 30.0;
/// Brightest pixel value a 16-bit sensor can report.
const SATURATION: u32 = u16::MAX as u32;

/// xorshift64*: tiny, fast, and good enough for noise.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(splitmix64(seed) | 1) // never zero: xorshift would stay at zero forever
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
    fn gaussian(&mut self) -> f64 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * PI * v).cos()
    }
}

pub(super) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 65536 gaussian noise values, indexed by 16 random bits.
fn noise_table() -> &'static [i32] {
    static TABLE: OnceLock<Vec<i32>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut rng = Rng::new(0x5eed);
        (0..1 << 16)
            .map(|_| (rng.gaussian() * NOISE_SIGMA).round() as i32)
            .collect()
    })
}

/// A point source: a PSF stamp at a fixed position.
struct Source {
    x0: i64,
    y0: i64,
    size: i64,
    /// `size × size` counts at the nominal brightness.
    stamp: Vec<u32>,
}

/// Everything fixed for a file: sky values, sources, and which sources touch each row.
pub(super) struct Pixels<'a> {
    params: &'a FitsParams,
    /// Sky level plus noise, indexed by 16 random bits.
    sky: Vec<u32>,
    sources: Vec<Source>,
    rows: Vec<Vec<u32>>,
}

impl<'a> Pixels<'a> {
    pub(super) fn new(params: &'a FitsParams) -> Pixels<'a> {
        let mut rng = Rng::new(params.seed ^ 0x50u64);
        let level = 950 + (rng.next() % 100) as i32;
        let sky = noise_table()
            .iter()
            .map(|n| (level + n).max(0) as u32)
            .collect();
        let sources: Vec<Source> = (0..params.sources)
            .map(|_| source(&mut rng, params))
            .collect();
        let mut rows = vec![Vec::new(); params.height as usize];
        for (i, s) in sources.iter().enumerate() {
            for y in s.y0.max(0)..(s.y0 + s.size).min(i64::from(params.height)) {
                rows[y as usize].push(i as u32);
            }
        }
        Pixels {
            params,
            sky,
            sources,
            rows,
        }
    }

    /// Frame `frame`: its own noise stream and a small brightness flicker per source.
    pub(super) fn frame(&self, frame: u32) -> Frame<'_> {
        let mut rng = Rng::new(self.params.seed.wrapping_add(u64::from(frame) + 1));
        let flicker = (0..self.sources.len())
            .map(|_| ((1.0 + 0.02 * rng.gaussian()).max(0.0) * 65536.0) as u64)
            .collect();
        Frame {
            pixels: self,
            rng,
            flicker,
            acc: vec![0; self.params.width as usize],
        }
    }
}

fn source(rng: &mut Rng, p: &FitsParams) -> Source {
    let sigma = 1.5 + rng.unit() * 0.8; // seeing of ~2-3 arcsec at 1.19"/pixel
    let saturated = rng.unit() < 0.03;
    let peak = if saturated {
        200_000.0
    } else {
        40.0 * (rng.unit() * 6.5).exp()
    };
    // Out to where the profile drops below ~3 counts, so no stamp edge shows.
    let radius = (sigma * (2.0 * (peak / 3.0f64).ln()).sqrt())
        .ceil()
        .clamp(3.0, 24.0) as i64;
    let size = 2 * radius + 1;
    let cx = (rng.unit() * f64::from(p.width)) as i64;
    let cy = (rng.unit() * f64::from(p.height)) as i64;
    let stamp = (0..size * size)
        .map(|i| {
            let (dx, dy) = ((i % size - radius) as f64, (i / size - radius) as f64);
            (peak * (-(dx * dx + dy * dy) / (2.0 * sigma * sigma)).exp()) as u32
        })
        .collect();
    Source {
        x0: cx - radius,
        y0: cy - radius,
        size,
        stamp,
    }
}

pub(super) struct Frame<'a> {
    pixels: &'a Pixels<'a>,
    rng: Rng,
    /// Per-source brightness factor, 16.16 fixed point.
    flicker: Vec<u64>,
    acc: Vec<u32>,
}

impl Frame<'_> {
    /// Fills `out` with row `y` as big-endian stored values (pixel − BZERO).
    pub(super) fn encode_row(&mut self, y: u32, out: &mut [u8]) {
        let sky = &self.pixels.sky;
        for quad in self.acc.chunks_mut(4) {
            let r = self.rng.next();
            for (k, px) in quad.iter_mut().enumerate() {
                *px = sky[(r >> (16 * k)) as usize & 0xffff];
            }
        }
        let width = i64::from(self.pixels.params.width);
        for &i in &self.pixels.rows[y as usize] {
            let s = &self.pixels.sources[i as usize];
            let scale = self.flicker[i as usize];
            let stamp_row =
                &s.stamp[((i64::from(y) - s.y0) * s.size) as usize..][..s.size as usize];
            for (dx, &v) in stamp_row.iter().enumerate() {
                let x = s.x0 + dx as i64;
                if (0..width).contains(&x) {
                    self.acc[x as usize] += ((u64::from(v) * scale) >> 16) as u32;
                }
            }
        }
        for (px, bytes) in self.acc.iter().zip(out.chunks_exact_mut(2)) {
            let value = (*px).min(SATURATION) as u16;
            bytes.copy_from_slice(&(value ^ 0x8000).to_be_bytes());
        }
    }
}
