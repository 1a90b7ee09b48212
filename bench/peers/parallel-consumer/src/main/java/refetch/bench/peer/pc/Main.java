package refetch.bench.peer.pc;

import java.util.List;
import java.util.Properties;

import io.confluent.parallelconsumer.ParallelConsumerOptions;
import io.confluent.parallelconsumer.ParallelConsumerOptions.CommitMode;
import io.confluent.parallelconsumer.ParallelConsumerOptions.ProcessingOrder;
import io.confluent.parallelconsumer.ParallelStreamProcessor;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.serialization.StringDeserializer;
import refetch.bench.peer.Harness;
import refetch.bench.peer.JsonlSink;
import refetch.bench.peer.SourceClient;

/**
 * Confluent Parallel Consumer as its documentation recommends for per-key work: KEY ordering (one
 * record per key at a time, many keys in parallel), the consumer's own auto-commit off, periodic
 * asynchronous commits of completed offsets. Each record: fetch the entity, write it (fsync), done.
 */
public final class Main {
    public static void main(String[] args) throws Exception {
        Harness h = Harness.start(args);
        Properties p = new Properties();
        p.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, h.brokers);
        p.put(ConsumerConfig.GROUP_ID_CONFIG, h.group);
        if (h.instanceId != null) {
            p.put(ConsumerConfig.GROUP_INSTANCE_ID_CONFIG, h.instanceId);
        }
        p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, false);
        p.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        p.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");
        p.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class);
        p.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class);
        KafkaConsumer<String, String> consumer = new KafkaConsumer<>(p);
        ParallelConsumerOptions<String, String> options = ParallelConsumerOptions.<String, String>builder()
                .ordering(ProcessingOrder.KEY)
                .maxConcurrency(64)
                .commitMode(CommitMode.PERIODIC_CONSUMER_ASYNCHRONOUS)
                .consumer(consumer)
                .build();
        ParallelStreamProcessor<String, String> pc = ParallelStreamProcessor.createEosStreamProcessor(options);
        JsonlSink sink = new JsonlSink(h.jsonl);
        SourceClient source = new SourceClient(h.source);
        pc.subscribe(List.of(h.topic));
        pc.poll(ctx -> {
            ConsumerRecord<String, String> r = ctx.getSingleConsumerRecord();
            h.consumedOne();
            Object[] n = Harness.parse(r.value());
            if (n == null) {
                return;
            }
            String id = (String) n[0];
            h.probe.received(id, (Long) n[1]);
            try {
                SourceClient.Fetched f = source.fetch(id);
                sink.write(List.of(new JsonlSink.Write(id, f.version(), f.body())));
                h.durable(id, f.version());
            } catch (Exception e) {
                throw new RuntimeException(e);
            }
        });
        h.awaitStop(null);
        try {
            pc.closeDontDrainFirst();
            h.report();
        } finally {
            System.exit(0);
        }
    }
}
