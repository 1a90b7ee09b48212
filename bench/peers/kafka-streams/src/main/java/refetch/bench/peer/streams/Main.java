package refetch.bench.peer.streams;

import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.Properties;

import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.serialization.StringSerializer;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Materialized;
import org.apache.kafka.streams.kstream.Suppressed;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.Record;
import refetch.bench.peer.Harness;
import refetch.bench.peer.JsonlSink;
import refetch.bench.peer.SourceClient;

/**
 * Kafka Streams: groupByKey, reduce to the notification with the highest version,
 * suppress(untilTimeLimit(200 ms, unbounded buffer)), then a processor that fetches the entity and
 * writes it (fsync). Suppression runs on stream time (record timestamps), so once the input ends
 * nothing more would be emitted: this harness sends one heartbeat record per partition per second
 * after the driver says the input ended (the heartbeats pass the reduce and suppression under their
 * own key and are dropped before the fetch). num.stream.threads = the topic's partitions; commit
 * interval 1 s (like refetch's default; the at-least-once default of 30 s would add up to 30 s to
 * every run); everything else at its defaults.
 */
public final class Main {
    static final String HEARTBEAT = "__heartbeat";

    static long version(String v) {
        Object[] n = Harness.parse(v);
        return n == null || n[1] == null ? -1 : (Long) n[1];
    }

    public static void main(String[] args) throws Exception {
        Harness h = Harness.start(args);
        JsonlSink sink = new JsonlSink(h.jsonl);
        SourceClient source = new SourceClient(h.source);

        StreamsBuilder b = new StreamsBuilder();
        b.stream(h.topic, Consumed.with(Serdes.String(), Serdes.String()))
                .peek((k, v) -> {
                    if (k != null && k.startsWith(HEARTBEAT)) {
                        return;
                    }
                    h.consumedOne();
                    Object[] n = Harness.parse(v);
                    if (n != null) {
                        h.probe.received((String) n[0], (Long) n[1]);
                    }
                })
                .groupByKey()
                .reduce((a, c) -> version(c) >= version(a) ? c : a, Materialized.as("latest"))
                .suppress(Suppressed.untilTimeLimit(Duration.ofMillis(200), Suppressed.BufferConfig.unbounded()))
                .toStream()
                .filter((k, v) -> k != null && !k.startsWith(HEARTBEAT))
                .process(() -> new Processor<String, String, Void, Void>() {
                    @Override
                    public void process(Record<String, String> r) {
                        String id = r.key();
                        try {
                            SourceClient.Fetched f = source.fetch(id);
                            sink.write(List.of(new JsonlSink.Write(id, f.version(), f.body())));
                            h.durable(id, f.version());
                        } catch (Exception e) {
                            throw new RuntimeException(e);
                        }
                    }
                });

        Properties p = new Properties();
        p.put(StreamsConfig.APPLICATION_ID_CONFIG, h.group);
        p.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, h.brokers);
        p.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, 1000);
        p.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, h.partitions);
        p.put(StreamsConfig.STATE_DIR_CONFIG, h.durableLog.toAbsolutePath().getParent()
                .resolve(h.durableLog.getFileName() + ".state").toString());
        p.put("consumer.auto.offset.reset", "earliest");
        if (h.instanceId != null) {
            p.put(StreamsConfig.mainConsumerPrefix("group.instance.id"), h.instanceId);
        }
        KafkaStreams streams = new KafkaStreams(b.build(), p);
        streams.start();

        Properties pp = new Properties();
        pp.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, h.brokers);
        pp.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class);
        pp.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class);
        KafkaProducer<String, String> heartbeats = new KafkaProducer<>(pp);
        long[] last = {0};
        h.awaitStop(() -> {
            Map<Integer, Long> end = h.endOffsets();
            long now = System.currentTimeMillis();
            if (end != null && now - last[0] >= 1000) {
                last[0] = now;
                for (int part : end.keySet()) {
                    heartbeats.send(new ProducerRecord<>(h.topic, part, now, HEARTBEAT + "-" + part, "{}"));
                }
                heartbeats.flush();
            }
        });
        try {
            heartbeats.close(Duration.ofSeconds(1));
            streams.close(Duration.ofSeconds(15));
            h.report();
        } finally {
            System.exit(0);
        }
    }
}
