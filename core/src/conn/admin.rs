//! Administrative requests: the broker's counters, summed over shards.

use crate::conn::Conn;
use shoal_wire::fb;

impl Conn {
    pub async fn metrics(&self, corr: u32) -> std::io::Result<()> {
        let m = self.reactor.metrics_all().await;
        self.respond(corr, fb::ResponseBody::MetricsResponse, |fbb| {
            let items: Vec<_> = m
                .iter()
                .map(|(k, v)| {
                    let name = fbb.create_string(k);
                    fb::Metric::create(
                        fbb,
                        &fb::MetricArgs {
                            name: Some(name),
                            value: *v,
                        },
                    )
                })
                .collect();
            let metrics = fbb.create_vector(&items);
            fb::MetricsResponse::create(
                fbb,
                &fb::MetricsResponseArgs {
                    metrics: Some(metrics),
                },
            )
            .as_union_value()
        })
        .await
    }
}
