//! The budget sweep of `smollm2 eval --budgets` as a PNG: KL(full || method) and attention recall
//! against the budget, one line per method, drawn with plotters on a bitmap and written atomically.
//!
//! Text needs a TrueType font; plotters' `ab_glyph` backend loads none of its own, so the chart
//! takes `SMOLLM2_FONT` or the first common sans-serif font found on the machine.

use std::path::{Path, PathBuf};

use image::ImageEncoder;
use plotters::prelude::*;

use crate::eval::Scores;
use crate::AppResult;

const WIDTH: u32 = 1400;
const HEIGHT: u32 = 560;
const FONT: &str = "sans-serif";

/// Fonts tried in order when `SMOLLM2_FONT` is not set.
const FONT_CANDIDATES: [&str; 8] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// One colour per method, in the order the methods first appear.
const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 0, 0),
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(127, 127, 127),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn font_path() -> AppResult<PathBuf> {
    if let Some(path) = std::env::var_os("SMOLLM2_FONT") {
        return Ok(PathBuf::from(path));
    }
    FONT_CANDIDATES.iter().map(PathBuf::from).find(|p| p.is_file()).ok_or_else(|| {
        format!("chart: no TrueType font found (tried {FONT_CANDIDATES:?}); set SMOLLM2_FONT to a .ttf file").into()
    })
}

/// Load the font once; `eval` calls it before its minutes of work so a missing font fails first.
pub fn register_font() -> AppResult<()> {
    static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let path = font_path().map_err(|e| e.to_string())?;
            let bytes = std::fs::read(&path).map_err(|e| format!("chart: font {}: {e}", path.display()))?;
            // The font lives as long as the process: plotters keeps a reference to it.
            plotters::style::register_font(FONT, FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
                .map_err(|_| format!("chart: font {}: not a TrueType or OpenType font", path.display()))
        })
        .clone()
        .map_err(Into::into)
}

/// Methods in the order they first appear in `rows`, each with its points sorted by budget.
fn series(rows: &[Scores]) -> Vec<(&'static str, Vec<&Scores>)> {
    let mut out: Vec<(&'static str, Vec<&Scores>)> = Vec::new();
    for s in rows {
        match out.iter_mut().find(|(m, _)| *m == s.method) {
            Some((_, points)) => points.push(s),
            None => out.push((s.method, vec![s])),
        }
    }
    for (_, points) in &mut out {
        points.sort_by_key(|s| s.budget);
    }
    out
}

type Metric = fn(&Scores) -> f64;

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    series: &[(&'static str, Vec<&Scores>)],
    caption: &str,
    y_label: &str,
    metric: Metric,
    log_y: bool,
) -> AppResult<()>
where
    DB::ErrorType: 'static,
{
    let budgets = series.iter().flat_map(|(_, p)| p.iter().map(|s| s.budget as f64));
    let (x_lo, x_hi) = budgets.fold((f64::MAX, f64::MIN), |(lo, hi), b| (lo.min(b), hi.max(b)));
    let (x_lo, x_hi) = if x_lo < x_hi { (x_lo, x_hi) } else { (x_lo - 1.0, x_hi + 1.0) };
    let values: Vec<f64> = series.iter().flat_map(|(_, p)| p.iter().map(|s| metric(s))).collect();
    let mut chart = ChartBuilder::on(area);
    chart.caption(caption, (FONT, 24)).margin(16).x_label_area_size(44).y_label_area_size(64);
    let style = |name: &str, i: usize| (name.to_string(), PALETTE[i % PALETTE.len()]);
    if log_y {
        // KL of `full` is 0: plot a floor under the smallest positive value.
        let positive = values.iter().copied().filter(|v| *v > 0.0);
        let lo = positive.clone().fold(f64::MAX, f64::min).min(1.0);
        let hi = positive.fold(f64::MIN, f64::max).max(lo * 10.0);
        let floor = lo / 2.0;
        let mut ctx = chart.build_cartesian_2d(x_lo..x_hi, (floor..hi * 1.5).log_scale())?;
        ctx.configure_mesh()
            .x_desc("budget (slots per KV head)")
            .y_desc(y_label)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()?;
        for (i, (method, points)) in series.iter().enumerate() {
            let (name, color) = style(method, i);
            let line: Vec<(f64, f64)> = points.iter().map(|s| (s.budget as f64, metric(s).max(floor))).collect();
            ctx.draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
            ctx.draw_series(line.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
        }
        ctx.configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    } else {
        let mut ctx = chart.build_cartesian_2d(x_lo..x_hi, 0.0..1.02)?;
        ctx.configure_mesh()
            .x_desc("budget (slots per KV head)")
            .y_desc(y_label)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()?;
        for (i, (method, points)) in series.iter().enumerate() {
            let (name, color) = style(method, i);
            let line: Vec<(f64, f64)> = points.iter().map(|s| (s.budget as f64, metric(s))).collect();
            ctx.draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
            ctx.draw_series(line.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
        }
        ctx.configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    Ok(())
}

/// Render the sweep to an RGB buffer: KL on a log axis on the left, recall on the right.
pub fn render(rows: &[Scores], title: &str) -> AppResult<Vec<u8>> {
    if rows.is_empty() {
        return Err("chart: no rows to draw".into());
    }
    register_font()?;
    let mut pixels = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, (FONT, 26))?;
        let (left, right) = root.split_horizontally(WIDTH / 2);
        let series = series(rows);
        draw_panel(&left, &series, "KL(full || method), lower is better", "mean KL (nats)", |s| s.kl, true)?;
        draw_panel(&right, &series, "attention recall, higher is better", "recall", |s| s.recall, false)?;
        root.present()?;
    }
    Ok(pixels)
}

/// Rows of a sweep's CSV (`method,budget,kl,top1,recall,rounds`, as `eval --csv` writes it).
///
/// # Errors
/// The file, line and field that do not parse; a method this crate does not know.
pub fn read_csv(path: &Path) -> AppResult<Vec<Scores>> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1).filter(|(_, l)| !l.trim().is_empty()) {
        let at = |what: &str| format!("{}:{}: {what}", path.display(), i + 1);
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 6 {
            return Err(at(&format!("expected 6 fields (method,budget,kl,top1,recall,rounds), got {}", f.len())).into());
        }
        let method = crate::eval::METHODS
            .iter()
            .chain(&crate::eval::ABLATIONS)
            .copied()
            .find(|m| *m == f[0])
            .ok_or_else(|| at(&format!("unknown method {:?}", f[0])))?;
        let num = |k: usize, name: &str| {
            f[k].parse::<f64>().map_err(|_| at(&format!("{name}: expected a number, got {:?}", f[k])))
        };
        rows.push(Scores {
            method,
            budget: f[1].parse().map_err(|_| at(&format!("budget: expected an integer, got {:?}", f[1])))?,
            kl: num(2, "kl")?,
            top1: num(3, "top1")?,
            recall: num(4, "recall")?,
            rounds: f[5].parse().map_err(|_| at(&format!("rounds: expected an integer, got {:?}", f[5])))?,
            seconds: 0.0,
        });
    }
    Ok(rows)
}

/// Write the sweep as a PNG at `path`, through a temporary file renamed on success.
pub fn write_png(path: &Path, rows: &[Scores], title: &str) -> AppResult<()> {
    let pixels = render(rows, title)?;
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(&pixels, WIDTH, HEIGHT, image::ExtendedColorType::Rgb8)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    crate::write_atomic(path, &png)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(method: &'static str, budget: usize, kl: f64, recall: f64) -> Scores {
        Scores { method, budget, kl, top1: 1.0, recall, rounds: 1, seconds: 0.0 }
    }

    #[test]
    fn sweep_draws_a_line_per_method_in_its_colour() {
        if font_path().map(|p| !p.is_file()).unwrap_or(true) {
            eprintln!("SKIPPED chart test: no TrueType font on this machine (set SMOLLM2_FONT)");
            return;
        }
        let rows = [
            row("full", 64, 0.0, 1.0),
            row("full", 128, 0.0, 1.0),
            row("triattention", 128, 0.05, 0.93),
            row("triattention", 64, 0.3, 0.8),
            row("random", 64, 1.5, 0.3),
            row("random", 128, 0.9, 0.5),
        ];
        let pixels = render(&rows, "test").unwrap();
        assert_eq!(pixels.len(), (WIDTH * HEIGHT * 3) as usize);
        let count = |c: RGBColor| pixels.chunks_exact(3).filter(|p| p == &[c.0, c.1, c.2]).count();
        // Each method's colour appears (line, markers, legend) in both panels.
        for (i, _) in ["full", "triattention", "random"].iter().enumerate() {
            assert!(count(PALETTE[i]) > 200, "method {i}: {} pixels of its colour", count(PALETTE[i]));
        }
        assert_eq!(count(PALETTE[3]), 0, "a fourth colour with three methods");
        // The PNG round-trips through the encoder and a decoder.
        let dir = std::env::temp_dir().join(format!("smollm2-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sweep.png");
        write_png(&path, &rows, "test").unwrap();
        let back = image::ImageReader::open(&path).unwrap().with_guessed_format().unwrap().decode().unwrap();
        assert_eq!((back.width(), back.height()), (WIDTH, HEIGHT));
        assert_eq!(back.to_rgb8().into_raw(), pixels);
        assert!(std::fs::read_dir(&dir).unwrap().count() == 1, "a temporary file left beside the chart");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(render(&[], "empty").is_err());
    }
}
