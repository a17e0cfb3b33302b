//! The plot: new-connection latency p50 (solid) and p99 (dashed) against the
//! number of Services, both axes logarithmic, one colour per row (the four
//! variants over IPv4; netboot and the floor over IPv6 and IPv4-mapped) (SVG).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::report::{m, Report};
use crate::variant::{Family, Row, Variant};

fn colour(r: Row) -> RGBColor {
    match (r.variant, r.family) {
        (Variant::Floor, Family::Ipv4) => RGBColor(90, 90, 90),
        (Variant::Netboot, Family::Ipv4) => RGBColor(0, 114, 178),
        (Variant::Iptables, _) => RGBColor(213, 94, 0),
        (Variant::Nftables, _) => RGBColor(0, 158, 115),
        (Variant::NetbootVariant, _) => RGBColor(240, 228, 66),
        (Variant::Floor, Family::Ipv6) => RGBColor(170, 170, 170),
        (Variant::Netboot, Family::Ipv6) => RGBColor(86, 180, 233),
        (Variant::Floor, Family::Ipv4Mapped) => RGBColor(140, 110, 60),
        (Variant::Netboot, Family::Ipv4Mapped) => RGBColor(204, 121, 167),
    }
}

/// (N, p50 µs, p99 µs).
pub type Point = (f64, f64, f64);

/// The points of every row, N ascending.
pub fn series(r: &Report) -> Vec<(Row, Vec<Point>)> {
    let b = r.config.endpoints_per_service;
    Row::ALL
        .iter()
        .map(|v| {
            let mut pts: Vec<Point> = r
                .config
                .services
                .iter()
                .filter_map(|n| {
                    r.stats(*n, b, v.name(), m::CONNECT)
                        .map(|s| (f64::from(*n), s.p50, s.p99))
                })
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            (*v, pts)
        })
        .collect()
}

/// Writes the SVG.
pub fn write_svg(r: &Report, path: &Path) -> Result<()> {
    let data = series(r);
    let xs: Vec<f64> = data
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.0))
        .collect();
    let ys: Vec<f64> = data
        .iter()
        .flat_map(|(_, p)| p.iter().flat_map(|x| [x.1, x.2]))
        .filter(|y| *y > 0.0)
        .collect();
    if xs.is_empty() || ys.is_empty() {
        return Err(anyhow!("no latency numbers to plot"));
    }
    let (xmin, xmax) = xs
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
    let (ymin, ymax) = ys
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(*y), b.max(*y)));
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| anyhow!("plot: {e:?}");
    root.fill(&WHITE).map_err(e)?;
    let caption = format!(
        "New-connection latency vs Services ({} endpoints each): p50 solid/circles, p99 dashed/triangles",
        r.config.endpoints_per_service
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(
            ((xmin / 1.6)..(xmax * 1.6)).log_scale(),
            ((ymin / 1.5)..(ymax * 1.5)).log_scale(),
        )
        .map_err(|e| anyhow!("plot: {e:?}"))?;
    chart
        .configure_mesh()
        .x_desc("Services (log)")
        .y_desc("connect() until established, µs (log)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(|e| anyhow!("plot: {e:?}"))?;
    for (v, pts) in &data {
        if pts.is_empty() {
            continue;
        }
        let c = colour(*v);
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.1)),
                c.stroke_width(2),
            ))
            .map_err(|e| anyhow!("plot: {e:?}"))?
            .label(format!("{} p50 / p99", v.label()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|p| Circle::new((p.0, p.1), 4, c.filled())))
            .map_err(|e| anyhow!("plot: {e:?}"))?;
        chart
            .draw_series(DashedLineSeries::new(
                pts.iter().map(|p| (p.0, p.2)),
                6,
                4,
                c.stroke_width(2),
            ))
            .map_err(|e| anyhow!("plot: {e:?}"))?;
        chart
            .draw_series(
                pts.iter()
                    .map(|p| TriangleMarker::new((p.0, p.2), 5, c.filled())),
            )
            .map_err(|e| anyhow!("plot: {e:?}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("plot: {e:?}"))?;
    root.present().map_err(e)?;
    Ok(())
}
