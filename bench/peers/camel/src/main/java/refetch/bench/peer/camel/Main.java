package refetch.bench.peer.camel;

import java.util.ArrayList;
import java.util.List;

import org.apache.camel.AggregationStrategy;
import org.apache.camel.CamelContext;
import org.apache.camel.Exchange;
import org.apache.camel.builder.RouteBuilder;
import org.apache.camel.component.kafka.KafkaConstants;
import org.apache.camel.component.kafka.consumer.KafkaManualCommit;
import org.apache.camel.impl.DefaultCamelContext;
import refetch.bench.peer.Harness;
import refetch.bench.peer.JsonlSink;

/**
 * Apache Camel: camel-kafka consumer with manual commit (auto-commit off), an Aggregator
 * correlated by entity id that keeps the highest version and completes after 200 ms without a new
 * notification for that id (completionTimeout) and hands completed aggregates to a thread pool
 * (parallelProcessing(), Camel's standard setting for concurrent completion), an enricher that
 * fetches the entity over HTTP
 * (camel-http), a processor that writes it (fsync), then the manual commits of every record the
 * aggregate covered.
 */
public final class Main {
    static final String COMMITS = "refetchCommits";

    public static void main(String[] args) throws Exception {
        Harness h = Harness.start(args);
        JsonlSink sink = new JsonlSink(h.jsonl);
        AggregationStrategy latest = (oldEx, newEx) -> {
            Object commit = newEx.getIn().getHeader(KafkaConstants.MANUAL_COMMIT);
            if (oldEx == null) {
                List<Object> commits = new ArrayList<>();
                commits.add(commit);
                newEx.setProperty(COMMITS, commits);
                return newEx;
            }
            @SuppressWarnings("unchecked")
            List<Object> commits = oldEx.getProperty(COMMITS, List.class);
            commits.add(commit);
            long ov = oldEx.getIn().getHeader("entityVersion", Long.class);
            long nv = newEx.getIn().getHeader("entityVersion", Long.class);
            if (nv > ov) {
                newEx.setProperty(COMMITS, commits);
                return newEx;
            }
            return oldEx;
        };
        String kafka = "kafka:" + h.topic + "?brokers=" + h.brokers + "&groupId=" + h.group
                + "&autoOffsetReset=earliest&autoCommitEnable=false&allowManualCommit=true"
                + "&isolationLevel=read_committed"
                + (h.instanceId != null ? "&groupInstanceId=" + h.instanceId : "");
        CamelContext ctx = new DefaultCamelContext();
        ctx.addRoutes(new RouteBuilder() {
            @Override
            public void configure() {
                from(kafka)
                    .process(ex -> {
                        h.consumedOne();
                        Object[] n = Harness.parse(ex.getIn().getBody(String.class));
                        if (n != null) {
                            ex.getIn().setHeader("entityId", n[0]);
                            ex.getIn().setHeader("entityVersion", n[1] == null ? -1L : (Long) n[1]);
                            h.probe.received((String) n[0], (Long) n[1]);
                        }
                    })
                    .aggregate(header("entityId"), latest)
                        .completionTimeout(200)
                        .completionTimeoutCheckerInterval(50)
                        .parallelProcessing()
                    .removeHeaders("*", "entityId", "entityVersion")
                    .enrich().simple(h.source + "/entity/${header.entityId}")
                    .process(ex -> {
                        String id = ex.getIn().getHeader("entityId", String.class);
                        String body = ex.getIn().getBody(String.class);
                        Object[] n = Harness.parse(body);
                        long v = n == null || n[1] == null ? -1 : (Long) n[1];
                        sink.write(List.of(new JsonlSink.Write(id, v, body)));
                        h.durable(id, v);
                        @SuppressWarnings("unchecked")
                        List<Object> commits = ex.getProperty(COMMITS, List.class);
                        if (commits != null) {
                            for (Object c : commits) {
                                if (c instanceof KafkaManualCommit mc) {
                                    mc.commit();
                                }
                            }
                        }
                    });
            }
        });
        ctx.start();
        h.awaitStop(null);
        try {
            ctx.stop();
            h.report();
        } finally {
            System.exit(0);
        }
    }
}
