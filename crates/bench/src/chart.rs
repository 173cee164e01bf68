//! The chart of a run: every phase as a ratio to its same-run reference (1.0 = as fast as
//! the reference), median bars with min-max whiskers, as SVG.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use crate::daemon::{self, Api};
use crate::{Args, Error, Stat, label};

struct Bar {
    name: String,
    median: f64,
    min: f64,
    max: f64,
    colour: RGBColor,
}

const PATCH: RGBColor = RGBColor(0x93, 0x78, 0x60);
const S3: RGBColor = RGBColor(0xc4, 0x4e, 0x52);

const COLOURS: [RGBColor; 4] = [
    RGBColor(0x4c, 0x72, 0xb0),
    RGBColor(0xdd, 0x84, 0x52),
    RGBColor(0x55, 0xa8, 0x68),
    RGBColor(0x81, 0x72, 0xb3),
];

fn bars(args: &Args, stats: &BTreeMap<String, BTreeMap<String, Stat>>) -> Vec<Bar> {
    let get = |g: &str, k: &str| stats.get(g).and_then(|g| g.get(k));
    let mut out = Vec::new();
    let mut push = |name: String, a: Option<&Stat>, r: Option<&Stat>, colour: RGBColor| {
        if let (Some(a), Some(r)) = (a, r)
            && r.median > 0.0
        {
            out.push(Bar {
                name,
                median: a.median / r.median,
                min: a.min / r.median,
                max: a.max / r.median,
                colour,
            });
        }
    };
    let phases = [
        ("write+sync", "write_mib_s", "copy_sync_mib_s"),
        ("write+flush", "write_flush_mib_s", "copy_sync_mib_s"),
        ("cold read", "cold_read_mib_s", "copy_sync_mib_s"),
        ("hot read", "hot_read_mib_s", "read_back_mib_s"),
    ];
    for (i, &bs) in args.block_sizes.iter().enumerate() {
        let l = label(bs);
        for (name, key, rkey) in phases {
            push(
                format!("{l} {name}"),
                get(&format!("library/{l}"), key),
                get(&format!("reference/{l}"), rkey),
                COLOURS[i % COLOURS.len()],
            );
        }
    }
    let dbs = args.daemon_block_size;
    let l = label(dbs);
    for n in daemon::CLIENTS {
        for (api, name, colour) in [(Api::Http, "daemon", COLOURS[3]), (Api::S3, "S3", S3)] {
            for (phase, key, rkey) in &phases[1..] {
                push(
                    format!("{l} {name} x{n} {phase}"),
                    get(&daemon::group(n, api, dbs), key),
                    get(&format!("reference/{l}"), rkey),
                    colour,
                );
            }
        }
    }
    // The patch workload's ratios are taken in each run (figure and reference measured
    // side by side), so their whiskers are the min and max of those.
    for (name, s) in crate::patch::bars(args, stats) {
        out.push(Bar {
            name,
            median: s.median,
            min: s.min,
            max: s.max,
            colour: PATCH,
        });
    }
    out
}

/// Writes the chart of `stats` to `path`.
pub fn draw(
    args: &Args,
    stats: &BTreeMap<String, BTreeMap<String, Stat>>,
    path: &Path,
) -> Result<(), Error> {
    let bars = bars(args, stats);
    if bars.is_empty() {
        return Ok(());
    }
    let top = bars.iter().map(|b| b.max).fold(1.5f64, f64::max) * 1.1;
    let height = 40 + 22 * bars.len() as u32 + 60;
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let caption = format!(
        "blockcache vs same-run references ({} MiB, {:.0}% duplicates, median of {} runs, whiskers min-max)",
        args.data_mib,
        args.dup * 100.0,
        args.runs
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(230)
        .build_cartesian_2d(0f64..top, (0..bars.len()).into_segmented())?;
    let names: Vec<String> = bars.iter().map(|b| b.name.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(bars.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .x_desc("ratio to the reference (copy+fsync; hot read: read back; patch, truncate: pwrite, ftruncate)")
        .draw()?;
    for (i, b) in bars.iter().enumerate() {
        chart.draw_series(std::iter::once(Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (b.median, SegmentValue::Exact(i + 1)),
            ],
            b.colour.mix(0.8).filled(),
        )))?;
        chart.draw_series(std::iter::once(PathElement::new(
            vec![
                (b.min, SegmentValue::CenterOf(i)),
                (b.max, SegmentValue::CenterOf(i)),
            ],
            BLACK.stroke_width(2),
        )))?;
    }
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(1.0, SegmentValue::Exact(0)), (1.0, SegmentValue::Last)],
        RED.stroke_width(1),
    )))?;
    root.present()?;
    Ok(())
}
